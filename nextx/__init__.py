"""nextx: one transformer for next-X prediction (autoregressive text, few-step IMM images)."""

__version__ = "0.1.0"
