"""`nextx data rows CONFIG [key=value ...]`: read packed batches through the real DataLoader and report packing.

Prints packing efficiency (the non-pad share of row tokens), documents, images, tokens by kind, bad samples and
rows/s for the config's data section, e.g.

    nextx data rows configs/tiny.yaml data.train_shards=data/shapes32 --batches 20
"""

from __future__ import annotations

import argparse
import json
import time


def pipeline_check(config: str | None, overrides: list[str], n_batches: int, num_workers: int | None = None) -> dict:
    """Read n_batches packed batches through build_loader; return packing and speed figures."""
    from nextx.config import load_config
    from nextx.data import build_loader

    cfg = load_config(config, overrides)
    loader = build_loader(cfg.data, num_workers=num_workers)
    nw = cfg.data.num_workers if num_workers is None else num_workers
    counts: dict = {}
    stats: dict = {}
    n_img = n = 0
    t0 = time.perf_counter()
    for batch in loader:
        if n == 1:
            t0 = time.perf_counter()  # the first batch pays worker start-up and tokenizer loading
        for k, v in batch.n_tokens().items():
            counts[k] = counts.get(k, 0) + v
        for k, v in batch.stats.items():
            stats[k] = stats.get(k, 0) + v
        n_img += batch.n_images
        n += 1
        if n == n_batches:
            break
    dt = time.perf_counter() - t0
    rows = n * cfg.data.batch_rows
    fig = {"batches": n, "rows": rows, "row_len": cfg.data.row_len,
           "packing_efficiency": 1 - counts["pad"] / counts["total"], "docs": stats.get("docs", 0),
           "images": n_img, "tokens_by_kind": counts, "bad_samples": stats.get("bad_sample", 0),
           "rows_per_s": (rows - cfg.data.batch_rows) / dt if n > 1 else float("nan"), "workers": nw}
    print(f"{rows} rows x {cfg.data.row_len} tokens: packing efficiency {fig['packing_efficiency']:.3f} "
          f"(non-pad share), {fig['docs']} docs, {n_img} images, {fig['bad_samples']} bad samples, "
          f"{fig['rows_per_s']:.0f} rows/s with {nw} worker(s)")
    print(f"tokens by kind: {counts}")
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nextx data rows", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config whose data section is read")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.train_shards=DIR")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the config's)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = p.parse_args(argv)
    fig = pipeline_check(a.config, a.overrides, a.batches, a.workers)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(fig, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
