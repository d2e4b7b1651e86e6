"""BatchedHFLM scores every request exactly as lm-eval's HFLM does: same tokens, same log-likelihoods."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lm_eval.models.huggingface import HFLM

from tailor.eval.scorer import BatchedHFLM
from tailor.models.base import base_dir, load_tokenizer
from tailor.models.tiny import tiny_hf_model, tiny_model

MAX_LEN = 48  # small, so long contexts are cut from the left and long documents take several windows


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(base_dir(None))  # SmolLM2's real tokenizer: real merges, spaces and BOS rules


@pytest.fixture(scope="module")
def bos_tok(tok):
    """SmolLM2's tokenizer made to prepend BOS, as Llama's does: where lm-eval's skip-BOS-if-present rule bites."""
    import copy

    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(tok.backend_tokenizer)
    bos = tok.eos_token  # SmolLM2's <|endoftext|>, id 0
    backend.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                special_tokens=[(bos, tok.convert_tokens_to_ids(bos))])
    out = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=bos)
    assert out("hi")["input_ids"][0] == tok.convert_tokens_to_ids(bos)
    return out


def _lms(model, tok, batch_tokens=200):
    kw = dict(pretrained=model, tokenizer=tok, backend="causal", max_length=MAX_LEN)
    return HFLM(batch_size=3, **kw), BatchedHFLM(batch_size=3, batch_tokens=batch_tokens, **kw)


def _requests(tok) -> list[SimpleNamespace]:
    long_ctx = " ".join(f"word{i}" for i in range(80))  # > MAX_LEN tokens: left-truncated
    bos = tok.decode(tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id)
    assert bos
    pairs = [("Question: how do you boil an egg?\nAnswer:", " Put it in boiling water."),
             ("Question: how do you boil an egg?\nAnswer:", " Freeze it overnight and then fry it."),
             ("The capital of France is ", "Paris"),  # a trailing space moves to the continuation
             ("Tabs and spaces\t  ", " end."),
             ("", "A sentence scored with no context at all."),  # the prefix token conditions it
             ("", "x"),
             (long_ctx, " and the last word"),
             ("Short", " " + " ".join(["long continuation"] * 10)),
             (bos + "A context that starts with the BOS text", " then goes on."),
             ("Unicode: café, naïve, 東京 —", " ok"),
             ("Pick one: A, B or C. Answer:", " A"), ("Pick one: A, B or C. Answer:", " B"),  # one-token choices:
             ("Pick one: A, B or C. Answer:", " C")]  # one input row serves all three
    return [SimpleNamespace(args=p) for p in pairs]


@pytest.mark.parametrize("family", ["tailor", "llama", "tailor+bos"])
def test_loglikelihood_equals_hflm(request, family):
    tok = request.getfixturevalue("bos_tok" if family.endswith("+bos") else "tok")
    model = tiny_model(vocab=len(tok), n_layers=2) if family == "tailor" else tiny_hf_model("llama", vocab=len(tok))
    ref, fast = _lms(model, tok)
    reqs = _requests(tok)
    want = ref.loglikelihood(reqs, disable_tqdm=True)
    got = fast.loglikelihood(reqs, disable_tqdm=True)
    assert len(got) == len(want)
    for (a, ga), (b, gb), r in zip(want, got, reqs):
        assert b == pytest.approx(a, abs=1e-4, rel=1e-5), r.args
        assert ga == gb, r.args
    assert len({round(a, 3) for a, _ in want}) == len(want)  # the requests really differ


def test_a_whitespace_context_is_the_empty_string_not_no_context(tok, bos_tok):
    """HFLM moves the spaces to the continuation and encodes "" as the context: nothing (refused) with SmolLM2's
    tokenizer, [BOS] with one that adds BOS; "no context" (the prefix token) is only for a context of ""."""
    req = [SimpleNamespace(args=(" ", "Paris is nice"))]
    ref, fast = _lms(tiny_model(vocab=len(tok), n_layers=1), tok)
    with pytest.raises(AssertionError):
        ref.loglikelihood(req, disable_tqdm=True)
    with pytest.raises(ValueError, match="empty context"):
        fast.loglikelihood(req, disable_tqdm=True)
    kw = dict(pretrained=tiny_model(vocab=len(tok), n_layers=1), tokenizer=bos_tok, backend="causal",
              max_length=MAX_LEN, prefix_token_id=1)  # a prefix token other than BOS: the two paths differ
    (a, _), = HFLM(batch_size=3, **kw).loglikelihood(req, disable_tqdm=True)
    (b, _), = BatchedHFLM(batch_size=3, **kw).loglikelihood(req, disable_tqdm=True)
    assert b == pytest.approx(a, abs=1e-4)


def test_tokenization_equals_hflms_split(tok):
    _, fast = _lms(tiny_model(vocab=len(tok), n_layers=1), tok)
    seen = []
    fast._loglikelihood_tokens = lambda reqs, disable_tqdm=False: seen.extend(reqs) or [(0.0, True)] * len(reqs)
    reqs = _requests(tok)
    fast.loglikelihood(reqs)
    for r, (_, ctx, cont) in zip(reqs, seen):
        c, x = r.args
        if c:
            want = fast._encode_pair(c, x)  # lm-eval's own split, one request at a time
        else:
            enc = fast.tok_encode(x, add_special_tokens=False)
            want = ([fast.prefix_token_id], enc) if enc[0] != fast.prefix_token_id else (enc[:1], enc[1:])
        assert (ctx, cont) == tuple(want), r.args


def test_rolling_perplexity_equals_hflm(tok):
    ref, fast = _lms(tiny_model(vocab=len(tok), n_layers=2), tok, batch_tokens=100)
    docs = [SimpleNamespace(args=(t,)) for t in
            ["A short document.", " ".join(f"token{i}" for i in range(120)), "Another one, of medium length here."]]
    want = ref.loglikelihood_rolling(docs, disable_tqdm=True)
    got = fast.loglikelihood_rolling(docs, disable_tqdm=True)
    assert got == pytest.approx(want, abs=1e-3, rel=1e-5)


def test_batching_does_not_change_scores(tok):
    model = tiny_model(vocab=len(tok), n_layers=2)
    reqs = _requests(tok)
    alone = _lms(model, tok, batch_tokens=1)[1]
    alone.HEAD_TOKENS = 3  # the head in slices of 3 positions
    one = alone.loglikelihood(reqs, disable_tqdm=True)  # every row alone
    many = _lms(model, tok, batch_tokens=10_000)[1].loglikelihood(reqs, disable_tqdm=True)  # rows of similar length together
    assert [g for _, g in one] == [g for _, g in many]
    assert [a for a, _ in many] == pytest.approx([a for a, _ in one], abs=1e-4)


def test_padding_stays_under_a_third_of_the_tokens(tok):
    """Rows of one forward are within MIN_FILL of its longest, so padded tokens <= real tokens / MIN_FILL."""
    model = tiny_model(vocab=len(tok), n_layers=1)
    fed = []
    model.model.layers[0].register_forward_pre_hook(lambda m, a: fed.append(a[0].shape[0] * a[0].shape[1]))
    fast = _lms(model, tok, batch_tokens=10_000)[1]
    reqs = [SimpleNamespace(args=("Q: " + "word " * n, " answer " * (1 + n % 3))) for n in range(1, 40)]
    fast.loglikelihood(reqs, disable_tqdm=True)
    real = sum(len((c + x)[-(MAX_LEN + 1):][:-1]) for c, x in
               (fast._encode_pair(*r.args) for r in reqs))
    assert len(fed) > 1 and sum(fed) <= real / fast.MIN_FILL


def test_one_token_choices_share_one_row(tok):
    model = tiny_model(vocab=len(tok), n_layers=1)
    rows = []
    model.model.layers[0].register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    fast = _lms(model, tok, batch_tokens=10_000)[1]
    reqs = [SimpleNamespace(args=("Pick one: A, B or C. Answer:", f" {c}")) for c in "ABC"]
    assert all(len(fast._encode_pair(*r.args)[1]) == 1 for r in reqs)
    got = fast.loglikelihood(reqs, disable_tqdm=True)
    assert rows == [1] and len({round(a, 4) for a, _ in got}) == 3


def test_a_shared_context_is_scored_once_for_all_its_answers(tok):
    """BBQ's shape: one context, several multi-token answers. Packed into one row (the context once, then each
    answer, attending to the context and to itself only, its positions going on from the context's), every answer
    scores what it scores alone, for fewer tokens. A member whose context + answer HFLM would cut from the left is
    scored alone, cut."""
    model = tiny_model(vocab=len(tok), n_layers=2)
    fed = []
    model.model.layers[0].register_forward_pre_hook(lambda m, a: fed.append(a[0].shape[0] * a[0].shape[1]))
    ctx = "At the park, a grandfather and his grandson tried to book a cab. Who was not comfortable using the phone?"
    answers = [" The grandfather", " The grandson", " Can't be determined", " Unknown", " The grandfather"]
    edge = "Count:" + "".join(f" {i}" for i in range(60))
    while len(tok(edge)["input_ids"]) > MAX_LEN - 3:  # room for a 1-token answer, not for an 8-token one
        edge = edge.rsplit(" ", 1)[0]
    edge_answers = [" x", " a b c d e f g h"]
    reqs = [SimpleNamespace(args=(ctx, a)) for a in answers] + [SimpleNamespace(args=(edge, a)) for a in edge_answers]
    packed, plain = _lms(model, tok, batch_tokens=10_000)[1], _lms(model, tok, batch_tokens=10_000)[1]
    plain.share_contexts = False
    enc = [packed._encode_pair(*r.args) for r in reqs]
    assert [len(c) + len(x) <= MAX_LEN + 1 for c, x in enc] == [True] * 6 + [False]  # the last one is cut
    assert sum(len(x) > 1 for _, x in enc[:4]) >= 2  # answers of several tokens (" Unknown" may be one)
    got = packed.loglikelihood(reqs, disable_tqdm=True)
    fed_packed, fed[:] = sum(fed), []
    want = plain.loglikelihood(reqs, disable_tqdm=True)
    assert [g for _, g in got] == [g for _, g in want]
    assert [a for a, _ in got] == pytest.approx([a for a, _ in want], abs=1e-4)
    assert got[0] == got[4] and len({round(a, 4) for a, _ in got}) == 6  # the repeated answer: one segment
    assert fed_packed < 0.8 * sum(fed)  # the context once instead of once per answer (padding included)


def test_packed_rows_stay_within_the_window_and_plain_forwards_keep_the_causal_kernel(tok):
    """Context-free requests (CrowS, StereoSet: every one has the one-token prefix as its context) are not
    gathered into one row; a context with more answers than one window holds takes several rows, each at most
    max_length long; a forward of plain rows gets no mask. Scores equal the unshared path's throughout."""
    model = tiny_model(vocab=len(tok), n_layers=1)
    calls = []  # (rows, length, packed?) per forward
    inner = model.hidden_states

    def spy(ids, table=None, positions=None, mask=None):
        calls.append((ids.shape[0], ids.shape[1], mask is not None))
        return inner(ids, table, positions, mask)

    model.hidden_states = spy
    free = [SimpleNamespace(args=("", f"Sentence number {i} is {'long ' * (i % 5)}enough.")) for i in range(60)]
    free += [SimpleNamespace(args=("", "word " * n)) for n in (36, 38, 40)]  # as long as the packed rows
    ctx = "Choose the word that follows best in the sentence below, please:"  # >= MIN_SHARED tokens
    many = [SimpleNamespace(args=(ctx, f" option {i} of many words")) for i in range(20)]  # > one window's worth
    reqs = free + many
    packed, plain = _lms(model, tok, batch_tokens=10_000)[1], _lms(model, tok, batch_tokens=10_000)[1]
    plain.share_contexts = False
    got = packed.loglikelihood(reqs, disable_tqdm=True)
    seen, calls[:] = list(calls), []
    want = plain.loglikelihood(reqs, disable_tqdm=True)
    assert [g for _, g in got] == [g for _, g in want]
    assert [a for a, _ in got] == pytest.approx([a for a, _ in want], abs=1e-4)
    assert max(length for _, length, _ in seen) <= MAX_LEN
    units, _ = packed._packed([(None, c, x) for c, x in packed.split_requests([r.args for r in reqs])])
    assert 2 <= len(units) < len(many)  # the 20 answers share a few rows, not one over-long row
    # masked forwards hold the packed rows and nothing else; the context-free rows run plain, causal kernel
    assert sum(rows for rows, _, masked in seen if masked) == len(units)
    assert any(not masked for _, _, masked in seen)


def test_bad_settings_are_refused(tok):
    with pytest.raises(ValueError, match="batch_tokens"):
        BatchedHFLM(pretrained=tiny_model(vocab=len(tok), n_layers=1), tokenizer=tok, backend="causal",
                    batch_tokens=0)


def test_templates_compile_once_and_render_the_same(monkeypatch):
    import lm_eval.utils as lu

    from tailor.eval.scorer import compiled_templates

    calls = []
    real = lu.env.from_string
    monkeypatch.setattr(lu.env, "from_string", lambda t: calls.append(t) or real(t))
    original = lu.apply_template
    docs = [{"q": f"question {i}", "choices": ["a", "b"]} for i in range(5)]
    tpl = "Q: {{q}}\n{% for c in choices %}- {{c}}\n{% endfor %}Answer:"
    want = [original(tpl, d) for d in docs]
    calls.clear()
    with compiled_templates():
        got = [lu.apply_template(tpl, d) for d in docs]
    assert got == want and calls == [tpl]  # five renders, one compile
    assert lu.apply_template is original


def test_a_task_asked_to_build_its_requests_again_with_the_same_arguments_keeps_them():
    """check_requests builds every task's requests, then lm-eval's evaluate() asks again (all arguments spelled
    out, defaults included): the second build is skipped; different arguments build anew; the method is back
    afterwards."""
    from tailor.eval.harness import requests_built_once

    class Task:
        def __init__(self):
            self.builds = []

        def build_all_requests(self, *, limit=None, rank=0, world_size=1, apply_chat_template=False):
            self.builds.append((limit, rank, world_size, apply_chat_template))

    a, b = Task(), Task()
    with requests_built_once([a, b]):
        a.build_all_requests(limit=None, rank=0, world_size=1)  # check_requests
        a.build_all_requests(limit=None, rank=0, world_size=1, apply_chat_template=False)  # evaluate(): kept
        b.build_all_requests(limit=None, rank=0, world_size=1)
        b.build_all_requests(limit=5, rank=0, world_size=1)  # not the same request set: built
    assert a.builds == [(None, 0, 1, False)]
    assert b.builds == [(None, 0, 1, False), (5, 0, 1, False)]
    assert "build_all_requests" not in vars(a) and "build_all_requests" not in vars(b)
