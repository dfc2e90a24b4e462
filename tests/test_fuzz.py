"""Property tests (hypothesis) of the pieces every input passes through: the caption grammar's parser, the packer and
the attention-mask builder, over random captions, random text and random documents. Examples are derandomised
(fixed seed) so CI is reproducible; a failure prints the shrunk counterexample."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_tools.shapes import (CELLS, COLOURS, NP, RELATIONS, SHAPES, SIZES, Caption, ParseError, format_caption,
                               parse_caption)
from nextx.masks import check_layout, dense_mask, reference_mask
from nextx.sequence import ImageTokens, Packer, layout_document
from test_masks import SP, layout_tensors

FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

nps = st.builds(NP, st.sampled_from(COLOURS), st.sampled_from(SHAPES), st.none() | st.sampled_from(list(SIZES)),
                st.none() | st.sampled_from(CELLS))
captions = st.one_of(st.lists(nps, min_size=1, max_size=3).map(lambda x: Caption(tuple(x))),
                     st.tuples(nps, st.sampled_from(RELATIONS), nps).map(lambda t: Caption((t[0], t[2]), t[1])))


@FUZZ
@given(captions)
def test_every_caption_round_trips(c):
    assert parse_caption(format_caption(c)) == c


WORDS = ["a", "an", "and", ",", "in", "the", "of", *COLOURS, *SHAPES, *SIZES, *" ".join(CELLS + RELATIONS).split(),
         "Red", "circles", "", "  "]


@FUZZ
@given(st.one_of(st.text(max_size=80), st.lists(st.sampled_from(WORDS), max_size=14).map(" ".join)))
def test_parser_accepts_exactly_the_language(text):
    """Anything: either a Caption that formats back to the very same text, or ParseError (never another error)."""
    try:
        c = parse_caption(text)
    except ParseError:
        return
    assert format_caption(c) == text


segments = st.lists(st.one_of(st.lists(st.integers(6, 60), min_size=1, max_size=6),
                              st.tuples(st.integers(1, 3), st.integers(1, 3), st.booleans())),
                    min_size=1, max_size=4)


def _layout(segs, copies: int):
    out = []
    for s in segs:
        if isinstance(s, tuple):
            h, w, gen = s
            out.append(ImageTokens(np.zeros((h * w, 2), np.float32), (h, w), generate=gen))
        else:
            out.append(s)
    return layout_document(out, SP, noise_copies=copies)


@FUZZ
@given(st.lists(segments, min_size=1, max_size=12), st.integers(4, 64), st.integers(1, 6), st.integers(1, 2))
def test_packer_keeps_every_fitting_document_whole_and_once(docs, row_len, buffer, copies):
    layouts = [_layout(d, copies) for d in docs]
    p = Packer(row_len, SP.pad, buffer)
    rows = [r for lay in layouts for r in p.add(lay)] + list(p.flush())
    assert all(len(r.ids) == row_len for r in rows)
    got = []
    for r in rows:
        n_docs = int(r.doc.max()) + 1 if (r.doc >= 0).any() else 0
        assert sorted(set(r.doc.tolist()) - {-1}) == list(range(n_docs))         # renumbered 0..k-1
        for k in range(n_docs):
            idx = np.flatnonzero(r.doc == k)
            assert (np.diff(idx) == 1).all()                                      # contiguous
            got.append((tuple(r.ids[idx]), tuple(r.kind[idx]), tuple(r.pos[idx])))
        assert (r.ids[r.doc < 0] == SP.pad).all()
    fitting = [(tuple(x.ids), tuple(x.kind), tuple(x.pos)) for x in layouts if len(x) <= row_len]
    assert sorted(got) == sorted(fitting)                                         # each fitting doc exactly once
    too_long = sum(r.stats.get("too_long", 0) for r in rows) + p.stats["too_long"]
    assert too_long == sum(len(x) > row_len for x in layouts)


@FUZZ
@given(st.lists(segments, min_size=1, max_size=10), st.integers(8, 48), st.integers(1, 4), st.integers(1, 2))
def test_mask_builder_equals_the_reference_on_packed_rows(docs, row_len, buffer, copies):
    p = Packer(row_len, SP.pad, buffer)
    rows = [r for d in docs for r in p.add(_layout(d, copies))] + list(p.flush())
    if not rows:
        return
    doc, kind, split, img = layout_tensors(rows)
    check_layout(doc, kind, split, img)
    assert torch.equal(dense_mask(doc, kind, split), reference_mask(doc, kind, split, img))


def test_fuzzers_can_fail():
    """The properties are not vacuous: a wrong article and a broken pack are caught."""
    with pytest.raises(ParseError):
        parse_caption("a orange star")
    lay = _layout([[7, 8, 9]], 1)
    p = Packer(4, SP.pad, 1)
    assert list(p.add(lay)) == [] and p.stats["too_long"] == 1
