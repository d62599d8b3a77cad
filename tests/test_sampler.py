"""Layout and unmasking policies, on logits written by hand."""

import pytest
import torch

from engine.api import DecodeOptions, EngineError, leaves_block
from engine.config import FAMILIES
from engine.loader import SpecialIds
from engine.sampler import SCHEDULES, Denoiser, build_layout, top_p_filter, transfer_schedule

MASK, EOS, BOS, PAD = 9, 8, 7, 8
VOCAB = 10
SPECIAL = SpecialIds(mask=MASK, eos=EOS, pad=PAD, bos=BOS)


def layout(prefix=(1, 2), suffix=(3,), n=4, **kw):
    args = dict(mask=MASK, bos=BOS, eos=EOS, eos_after_suffix=True, shifted=True, max_len=100)
    return build_layout(list(prefix), list(suffix), n, **{**args, **kw})


def test_layout_per_family():
    dream = layout()
    assert dream.tokens == [BOS, 1, 2, MASK, MASK, MASK, MASK, 3, EOS]
    assert (dream.start, dream.end) == (3, 7)
    llada = layout(eos_after_suffix=False, shifted=False)
    assert llada.tokens == [BOS, 1, 2, MASK, MASK, MASK, MASK, 3]


def test_layout_with_empty_context():
    assert layout(prefix=(), suffix=(), n=2).tokens == [BOS, MASK, MASK, EOS]
    # A shifted model without BOS still needs a position before the first mask.
    assert layout(prefix=(), suffix=(), n=2, bos=None).tokens == [EOS, MASK, MASK, EOS]
    assert layout(prefix=(), suffix=(), n=2, bos=None, shifted=False).tokens == [MASK, MASK, EOS]


def test_layout_trims_the_far_ends():
    out = layout(prefix=range(100, 200), suffix=range(300, 400), n=10, max_len=50)
    assert len(out.tokens) == 50
    middle = out.tokens.index(MASK)
    assert out.tokens[middle - 1] == 199  # the prefix keeps its end
    assert out.tokens[middle + 10] == 300  # the suffix keeps its start
    with pytest.raises(ValueError, match="do not fit"):
        layout(n=60, max_len=50)


def test_transfer_schedule():
    """LLaDA's get_num_transfer_tokens: n // steps each, the remainder one each to the first steps."""
    assert transfer_schedule(10, 4) == [3, 3, 2, 2]
    assert transfer_schedule(32, 16) == [2] * 16
    assert transfer_schedule(8, 8) == [1] * 8
    assert transfer_schedule(5, 2) == [3, 2]
    assert transfer_schedule(3, 8) == [1, 1, 1]


@pytest.mark.parametrize("n, steps, counts", [
    # Times 1, .75025, .5005, .25075, .001: 10 * .24975 = 2.5 -> 2; 8 * (1 - .5005 / .75025) = 2.66 -> 2;
    # 6 * (1 - .25075 / .5005) = 2.99 -> 2; the last step all 4 left.
    (10, 4, [2, 2, 2, 4]),
    # Each step's time falls by .999 / 8: the first unmasks int(8 * .124875) = 0, then 8 * .1427 and
    # 7 * .1665 ... -> 1 each; 2 are left for the last.
    (8, 8, [0, 1, 1, 1, 1, 1, 1, 2]),
    # 32 * .0624375 = 1.998 -> 1, then 31 * (1 - .875125 / .9375625) = 2.06 -> 2, ... 3 at the last.
    (32, 16, [1] + [2] * 14 + [3]),
    (5, 2, [2, 3]),  # 5 * (1 - .5005) = 2.4975 -> 2
    (12, 3, [3, 4, 5]),  # 12 * .333 = 3.996 -> 3; 9 * (1 - .334 / .667) = 4.49 -> 4
    (16, 1, [16]),
])
def test_dream_schedule_as_dreams_decoder_counts(n, steps, counts):
    """Dream's _sample: over times linspace(1, 1e-3, steps + 1), the step from t to s unmasks
    int(m * (1 - s / t)) of the m masks left, the last step every mask left."""
    assert transfer_schedule(n, steps, "dream") == counts
    assert sum(counts) == n


def test_each_family_spreads_its_masks_by_its_own_decoders_schedule():
    assert {name: family.schedule for name, family in FAMILIES.items() if family.schedule != "even"} == \
        {"dream": "dream", "coda": "dream"}  # Dream's generation_utils.py, and CoDA's own copy of it
    assert {family.schedule for family in FAMILIES.values()} <= set(SCHEDULES)
    with pytest.raises(ValueError, match="schedule"):
        transfer_schedule(4, 2, "cosine")


def test_a_dream_step_that_unmasks_nothing_is_not_run():
    den = Denoiser(layout(n=8), 1, DecodeOptions(policy="steps", steps=8), SPECIAL, device="cpu", schedule="dream")
    assert [den.step_count(i) for i in range(7)] == [1, 1, 1, 1, 1, 1, 2]
    even = Denoiser(layout(n=8), 1, DecodeOptions(policy="steps"), SPECIAL, device="cpu")
    assert [even.step_count(i) for i in range(8)] == [1] * 8


@pytest.mark.parametrize("n, steps", [(8, 8), (10, 4), (32, 16), (24, 7), (50, 50)])
def test_dreams_counts_from_the_masks_left_equal_the_schedule_from_n_and_steps(n, steps):
    """Dream derives each step's count from the masks its state has left; Lacuna's schedule
    (which the CUDA-graph path reads ahead, step by step) from (n, steps). Greedy, each step unmasks
    exactly its count, so the two agree: a run that counts as Dream does, from the masks left."""
    den = Denoiser(layout(n=n), 1, DecodeOptions(policy="steps", steps=steps), SPECIAL, device="cpu",
                   schedule="dream")
    times = torch.linspace(1, 1e-3, steps + 1)
    generator = torch.Generator().manual_seed(n)
    for i in range(steps):
        left = den.masked.sum() / 1  # as Dream's _sample: the masks left per row, in float32
        count = int(left * (1 - times[i + 1] / times[i])) if i < steps - 1 else int(left)
        if count == 0:
            continue  # Dream runs a forward and keeps nothing; Lacuna runs none
        assert den.step_count(den.steps) == count
        logits = torch.randn(1, n, VOCAB, generator=generator)
        logits[..., EOS] = -1e9  # no stop: every mask is Dream's to unmask
        den.update(logits, torch.arange(n))
        assert int(den.masked.sum()) == int(left) - count
    assert den.done


def logits_for(rows):
    """Logits (1, n, VOCAB) that put probability p on token t at each position."""
    out = torch.full((1, len(rows), VOCAB), -1e9)
    for i, (token, p) in enumerate(rows):
        rest = (1 - p) / (VOCAB - 1)
        out[0, i] = torch.log(torch.full((VOCAB,), rest))
        out[0, i, token] = torch.log(torch.tensor(p))
    return out


def denoiser(n=4, **options):
    return Denoiser(layout(n=n), 1, DecodeOptions(**options), SPECIAL, device="cpu")


def breaks(*ids):
    """Line-break flags per vocabulary id: True for `ids`."""
    return torch.isin(torch.arange(VOCAB), torch.tensor(ids))


def step(den, rows):
    den.update(logits_for(rows), torch.arange(len(rows)))


def test_threshold_unmasks_every_confident_position():
    den = denoiser(policy="threshold", threshold=0.9)
    step(den, [(1, 0.95), (2, 0.5), (3, 0.92), (4, 0.3)])
    assert den.masked.tolist() == [[False, True, False, True]]
    assert den.middle.tolist() == [[1, MASK, 3, MASK]]


def test_threshold_unmasks_at_least_one():
    den = denoiser(policy="threshold", threshold=0.99)
    step(den, [(1, 0.2), (2, 0.6), (3, 0.3), (4, 0.3)])
    assert den.masked.tolist() == [[True, False, True, True]]


def test_low_confidence_remasking_follows_the_schedule():
    den = denoiser(n=4, policy="steps", steps=2)
    step(den, [(1, 0.2), (2, 0.6), (3, 0.7), (4, 0.3)])
    assert den.masked.tolist() == [[True, False, False, True]]
    step(den, [(1, 0.2), (2, 0.6), (3, 0.7), (4, 0.3)])
    assert den.done and den.steps == 2
    assert den.result_rows()[0][0] == [1, 2, 3, 4]


def test_equal_scores_go_to_the_leftmost_position():
    for count, kept in ((1, [0]), (2, [0, 2])):
        den = denoiser(n=4, policy="fixed", tokens_per_step=count)
        step(den, [(1, 0.6), (2, 0.3), (3, 0.6), (4, 0.6)])
        assert [i for i, masked in enumerate(den.masked[0].tolist()) if not masked] == kept


def test_orderings_rank_positions_differently():
    spread = lambda mass, k: [mass / k] * k  # noqa: E731
    probs = torch.tensor([[
        [0.49, 0.49, 0.02] + [1e-9] * 7,  # lowest entropy
        [0.5, 0.44] + spread(0.06, 8),  # highest confidence
        [0.42] + spread(0.58, 9),  # widest margin
    ]])
    for ordering, chosen in (("entropy", 0), ("confidence", 1), ("margin", 2)):
        den = denoiser(n=3, policy="fixed", tokens_per_step=1, ordering=ordering)
        den.update(probs.log(), torch.arange(3))
        assert den.masked[0].tolist().index(False) == chosen, ordering


def test_left_to_right_keeps_the_leftmost_and_the_confident_run_after_it():
    den = denoiser(n=5, policy="threshold", threshold=0.9, ordering="left_to_right")
    step(den, [(1, 0.2), (2, 0.95), (3, 0.5), (4, 0.99), (5, 0.1)])
    assert den.masked.tolist() == [[False, False, True, True, True]]  # 4 is confident but not next
    den.update(logits_for([(3, 0.95), (4, 0.99), (5, 0.1)]), torch.arange(2, 5))
    assert den.masked.tolist() == [[False, False, False, False, True]]
    den.update(logits_for([(5, 0.5)]), torch.arange(4, 5))
    assert den.done and den.result_rows()[0][0] == [1, 2, 3, 4, 5]
    # With a fixed count, the leftmost positions.
    den = denoiser(n=4, policy="fixed", tokens_per_step=2, ordering="left_to_right")
    step(den, [(1, 0.2), (2, 0.1), (3, 0.99), (4, 0.99)])
    assert den.masked.tolist() == [[False, False, True, True]]


def test_eos_ends_the_infill():
    den = denoiser(n=4, policy="threshold", threshold=0.9)
    step(den, [(5, 0.95), (EOS, 0.95), (2, 0.1), (3, 0.1)])
    assert den.done  # the masks after EOS became pad
    assert den.middle.tolist() == [[5, EOS, PAD, PAD]]
    tokens, confidences = den.result_rows()[0]
    assert tokens == [5] and len(confidences) == 1


def test_min_tokens_keeps_the_first_tokens_from_ending_the_infill():
    den = denoiser(n=3, policy="threshold", threshold=0.9, min_tokens=1)
    step(den, [(PAD, 0.95), (PAD, 0.95), (PAD, 0.95)])
    first = den.middle[0, 0].item()
    assert first not in (EOS, PAD) and den.middle[0, 1:].tolist() == [PAD, PAD]
    assert den.result_rows()[0][0] == [first]


def test_a_single_line_ends_after_its_line_break_which_never_comes_first():
    NEWLINE = 4  # a token whose text holds a line break
    den = Denoiser(layout(n=4), 1, DecodeOptions(policy="threshold", threshold=0.9, min_tokens=1,
                                                 single_line=True), SPECIAL, device="cpu",
                   line_breaks=(breaks(NEWLINE), breaks(NEWLINE)))
    step(den, [(NEWLINE, 0.99), (NEWLINE, 0.95), (5, 0.1), (6, 0.99)])
    assert den.middle[0, 0].item() != NEWLINE  # a line break first would be an empty line
    assert den.middle[0, 1:].tolist() == [NEWLINE, PAD, PAD] and not den.masked[0, 1:].any()
    # A healed first token gives back "\n    " (the cursor after an indentation): no line break
    # of the answer's own.
    HEALED = 3
    den = Denoiser(layout(n=3), 1, DecodeOptions(policy="threshold", threshold=0.9, min_tokens=1,
                                                 single_line=True), SPECIAL, device="cpu",
                   line_breaks=(breaks(NEWLINE), breaks(NEWLINE, HEALED)))
    step(den, [(HEALED, 0.99), (5, 0.99), (NEWLINE, 0.99)])
    assert den.middle[0].tolist() == [HEALED, 5, NEWLINE]
    # Without single_line the same step keeps decoding past the line break.
    den = denoiser(n=4, policy="threshold", threshold=0.9, min_tokens=1)
    step(den, [(NEWLINE, 0.99), (NEWLINE, 0.95), (5, 0.1), (6, 0.99)])
    assert den.masked[0].tolist() == [False, False, True, False]


def test_a_causal_model_keeps_the_drafted_tokens_it_agrees_with():
    """Prompt lookup: after `1 2 3 1 2` and a decoded `3`, what followed the earlier `1 2 3` is
    drafted; predictions from the drafts are kept up to the first that differs from its draft."""
    den = Denoiser(layout(prefix=(1, 2, 3, 1, 2), suffix=(), n=6), 1, DecodeOptions(), SPECIAL,
                   device="cpu", causal=True)
    den.update(logits_for([(3, 0.9)]), den.columns_to_predict())
    assert den.middle.tolist() == [[3, 1, 2, MASK, MASK, MASK]]
    assert den.columns_to_predict().tolist() == [1, 2, 3]
    # 1 is the draft, so 5 (predicted from it) is kept; 5 is not the draft 2, so 6 (from 2) is not.
    den.update(logits_for([(1, 0.9), (5, 0.9), (6, 0.9)]), den.columns_to_predict())
    assert den.middle.tolist() == [[3, 1, 5, MASK, MASK, MASK]]  # `5` was never seen before: no draft
    assert den.masked.tolist() == [[False, False, False, True, True, True]]
    assert den.columns_to_predict().tolist() == [3]


def test_a_causal_model_may_heal_in_two_tokens_the_second_taking_the_rest():
    """The text given back split: where the first token is 4 (its start), the second must be one
    of the tokens that start with the rest (5, 6); where it is 1 (all of it), anything goes."""
    allowed_first = breaks(1, 4)  # as flags: the first tokens that start, or take part of, the text
    split = (torch.tensor([4]), breaks(5, 6)[None])
    for first, second in ((4, 5), (1, 2)):
        den = Denoiser(layout(n=3), 1, DecodeOptions(lookup=0), SPECIAL, device="cpu", causal=True,
                       first_tokens=allowed_first, split_healing=split)
        den.update(logits_for([(first, 0.6)]), den.columns_to_predict())
        den.update(logits_for([(2, 0.6)]), den.columns_to_predict())  # 2 is the model's choice
        assert den.middle[0, :2].tolist() == [first, second]


def test_without_lookup_a_causal_model_decodes_one_token_a_step():
    den = Denoiser(layout(prefix=(1, 2, 3, 1, 2), suffix=(), n=6), 1, DecodeOptions(lookup=0), SPECIAL,
                   device="cpu", causal=True)
    den.update(logits_for([(3, 0.9)]), den.columns_to_predict())
    assert den.middle.tolist() == [[3, MASK, MASK, MASK, MASK, MASK]]
    assert den.columns_to_predict().tolist() == [1]


def test_partial_result_stops_at_the_first_mask():
    den = denoiser(n=4, policy="threshold", threshold=0.9)
    step(den, [(5, 0.95), (6, 0.1), (7, 0.95), (3, 0.1)])
    assert den.result_rows(partial=True)[0][0] == [5]


def test_ending_a_row_pads_what_is_still_masked():
    den = denoiser(n=4, policy="threshold", threshold=0.9)
    step(den, [(5, 0.95), (6, 0.1), (7, 0.95), (3, 0.1)])
    den.end_row(0)
    assert den.done and den.result_rows()[0][0] == [5]


@pytest.mark.parametrize("text, indent, leaves", [
    ("x += 1\n    return x\n", 5, True),  # back at the indentation of the line that opened the block
    ("x += 1\n    return x", 5, False),  # that line is not whole yet
    ("x += 1\n        y = 2\n", 5, False),  # still inside
    ("x = 1\n\n  \n", 5, False),  # blank lines leave nothing
    ("a()\n    else:\n", 5, False),  # it carries the block on
    ("a()\n} else {\n", 1, False),
    ("a()\n}\n", 1, True),
    ("x\n\treturn\n", 2, True),  # columns are characters: a tab is one
    ("return x\n", 1, False),  # the first line is the cursor's, whatever its indentation
])
def test_a_block_is_left_by_a_whole_line_indented_less_that_opens_nothing(text, indent, leaves):
    assert leaves_block(text, indent) is leaves


def test_mask_token_is_never_predicted():
    den = denoiser(n=2, policy="threshold", threshold=0.5)
    step(den, [(MASK, 0.99), (MASK, 0.99)])
    assert MASK not in den.middle.tolist()[0][:1]


def test_non_finite_logits_fail_the_request():
    den = denoiser(n=2)
    bad = logits_for([(1, 0.9), (2, 0.9)])
    bad[0, 1, 3] = float("nan")
    with pytest.raises(EngineError, match="NaN"):
        den.update(bad, torch.arange(2))


def test_top_p_keeps_the_smallest_sufficient_set():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert top_p_filter(probs, 0.7)[0].tolist() == pytest.approx([0.625, 0.375, 0, 0])
    assert top_p_filter(probs, 1.0)[0].tolist() == pytest.approx(probs[0].tolist())


def test_temperature_sampling_is_seeded():
    def draw(seed):
        gen = torch.Generator().manual_seed(seed)
        den = Denoiser(layout(n=6), 2, DecodeOptions(temperature=1.0, top_p=0.9), SPECIAL, device="cpu",
                       generator=gen)
        flat = torch.zeros(2, 6, VOCAB)
        den.update(flat, torch.arange(6))
        return den.middle.tolist()
    assert draw(1) == draw(1)
    assert any(draw(1) != draw(seed) for seed in range(2, 6))


@pytest.mark.parametrize("bad", [dict(policy="greedy"), dict(ordering="random"), dict(steps=0),
                                 dict(threshold=1.5), dict(threshold=0), dict(threshold=-0.1),
                                 dict(threshold=float("nan")), dict(temperature=-1), dict(top_p=0),
                                 dict(tokens_per_step=0), dict(refresh_every=-1), dict(min_tokens=-1),
                                 dict(lookup=-1), dict(block_indent=-1)])
def test_invalid_options(bad):
    with pytest.raises(ValueError):
        DecodeOptions(**bad)
