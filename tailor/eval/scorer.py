"""lm-eval's HFLM with its log-likelihood loop batched: the same numbers, without per-request Python.

HFLM scores a multiple-choice request in Python: one `tokenizer.encode` per string, one tensor per request,
and after each forward a loop that slices, argmaxes and `.item()`s one request at a time (a GPU sync per
request). On an H200 the 135M model's full-profile suite ran at ~200 requests/s whatever the token count
(reports/bench/evaluate.json: 419 s per model, CPU-seconds equal to wall seconds). `BatchedHFLM` keeps
everything lm-eval decides -- requests, the context/continuation split (`TemplateLM._encode_pair`), left
truncation to `max_length`, the rolling windows of perplexity, the aggregation -- and changes only how the
numbers are computed:

- each Jinja prompt template is compiled once (`compiled_templates`), not once per document;
- every distinct string is tokenized once, in batched calls of the fast tokenizer;
- requests are sorted by length and packed into forwards of at most `batch_tokens` padded tokens, rows of
  similar length together (`MIN_FILL`);
- the log-softmax is taken only at continuation positions, in float32, and the sums, the greedy check and
  the copy to the host happen once per forward;
- with a Tailor model, a context shared by several answers (a multiple-choice question) is computed once: one
  row holds the context, then each answer, which attends to the context and to itself only and takes the
  positions it would have after the context alone (`TailorForCausalLM.hidden_states` positions / mask). BBQ's
  three answers per context then cost ~one context instead of three.

Results equal HFLM's to float rounding for float32 logits, which Tailor's models always return
(tests/unit/test_eval_scorer.py compares both on every request kind). Two known differences: with bf16
logits HFLM takes the log-softmax in bf16 where this takes it in float32; and where two requests with
different contexts tokenize to one shared prefix and differ in continuation length, HFLM's one-token
"logits cache" reads the shorter one's log-probs from the wrong positions (lm-eval 0.4.13), this does not.
"""
from __future__ import annotations

import contextlib
import functools
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import lm_eval.utils
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import _add_special_kwargs, has_bos_prefix
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

Request = tuple[Any, list[int], list[int]]  # (cache key, context tokens, continuation tokens)


@dataclass
class _Unit:
    """One row of a forward: its tokens; seg None (one causal sequence at positions 0..n-1) or per token 0 (the
    shared context) or s >= 1 (the s-th continuation), with each token's position; per request served (request
    index, the row's indices whose logits predict its continuation, the continuation)."""
    ids: list[int]
    seg: list[int] | None
    reqs: list[tuple[int, list[int], list[int]]]
    positions: list[int] | None = None


@contextlib.contextmanager
def compiled_templates() -> Iterator[None]:
    """lm-eval with each Jinja prompt template compiled once instead of once per document.

    `lm_eval.utils.apply_template` calls `env.from_string(template)` for every doc_to_text / doc_to_choice /
    doc_to_target of every document: on the GPU machine that compile cost more than the model (MMLU's 14,042
    questions, each built twice). Same environment, same template text, so the same compiled template and the
    same prompts; the original function is restored on exit.
    """
    original = lm_eval.utils.apply_template
    compile_once = functools.lru_cache(maxsize=256)(lm_eval.utils.env.from_string)
    lm_eval.utils.apply_template = lambda template, doc: compile_once(template).render(**doc)
    try:
        yield
    finally:
        lm_eval.utils.apply_template = original


class BatchedHFLM(HFLM):
    """HFLM (causal backend) whose loglikelihood / loglikelihood_rolling are batched end to end.

    batch_tokens: padded tokens per forward (rows x longest row); one row longer than that runs alone.
    Other arguments are HFLM's.
    """

    def __init__(self, *args: Any, batch_tokens: int = 16384, share_contexts: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.share_contexts = share_contexts  # a context scored once for all its continuations (Tailor models)
        if self.backend != "causal":
            raise ValueError(f"BatchedHFLM scores causal models only, not backend={self.backend!r}")
        if batch_tokens <= 0:
            raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
        self.batch_tokens = batch_tokens
        self._memo: dict[tuple, dict[str, list[int]]] = {}

    # -- tokenization: HFLM.tok_encode's rules, one batched call per distinct kwargs --------------------------
    def encode_many(self, strings: list[str], add_special_tokens: bool | None = None) -> dict[str, list[int]]:
        """{string: token ids} exactly as `tok_encode(string, add_special_tokens)` gives them. Strings seen
        before come from a memo (the harness checks every request's tokens before lm-eval scores them)."""
        bos_str = self.tokenizer.decode(self.prefix_token_id)
        memo = self._memo.setdefault((add_special_tokens, self.add_bos_token, bos_str), {})  # all tok_encode reads
        groups: dict[tuple, list[str]] = defaultdict(list)
        for s in dict.fromkeys(strings):
            if s in memo:
                continue
            kw = _add_special_kwargs(add_special_tokens, self.add_bos_token)
            if add_special_tokens is None and has_bos_prefix(s, bos_str):
                kw["add_special_tokens"] = False  # the string already starts with BOS (HFLM.tok_encode)
            groups[tuple(sorted(kw.items()))].append(s)
        for kw, group in groups.items():
            ids = self.tokenizer(group, **dict(kw))["input_ids"]
            memo.update(zip(group, ids, strict=True))
        return {s: memo[s] for s in strings}

    def split_requests(self, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """(context tokens, continuation tokens) per (context, continuation) pair, as TemplateLM.loglikelihood
        splits them: trailing spaces of the context move to the continuation, the whole string is encoded and
        the context's tokens cut off; no context means the prefix token (BOS) conditions the continuation."""
        split: list[tuple[str, str] | None] = []  # after the move; None for a request with no context at all
        for context, continuation in pairs:
            stripped = context.rstrip()  # "" for an all-whitespace context: encoded as "", as HFLM does
            split.append((stripped, context[len(stripped):] + continuation) if context else None)
        ctx_free = [x for (c, x), sp in zip(pairs, split, strict=True) if sp is None]
        full = self.encode_many([c + x for c, x in filter(None, split)])
        ctx = self.encode_many([c for c, _ in filter(None, split)])
        bare = self.encode_many(ctx_free, add_special_tokens=False)
        out = []
        for (_, x0), sp in zip(pairs, split, strict=True):
            if sp is not None:
                c, x = sp
                ce = ctx[c]
                out.append((ce, full[c + x][len(ce):]))
            else:
                xe = bare[x0]
                out.append(([self.prefix_token_id], xe) if not xe or self.prefix_token_id != xe[0] else (xe[:1], xe[1:]))
        return out

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """TemplateLM.loglikelihood, tokenized in batches (split_requests) and scored in batches."""
        pairs = [req.args for req in requests]
        reqs: list[Request] = [(p, c, x) for p, (c, x) in zip(pairs, self.split_requests(pairs), strict=True)]
        self._memo.clear()  # kept from check_requests to here only: BBQ alone would hold ~0.6 GB of token lists
        return self._loglikelihood_tokens(reqs, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Perplexity windows as HFLM.loglikelihood_rolling makes them, all scored in one batched pass."""
        texts = [req.args[0] for req in requests]
        enc = self.encode_many(texts)
        self._memo.clear()
        windows: list[Request] = []
        owner: list[int] = []
        for i, text in enumerate(texts):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=enc[text], prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(texts)
        for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm), strict=True):
            totals[i] += ll
        for text, total in zip(texts, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    # -- scoring -------------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, continuation is the greedy decode) per request, in request order.

        Each request's input is (context + continuation)[-(max_length + 1):][:-1], as in HFLM; the last
        len(continuation) positions predict the continuation. Requests with the same input share one row of a
        forward (the choices of a one-token answer: HFLM's "logits cache" does the same). With `share_contexts`
        and a Tailor model, requests with the same context that fits whole (a question's answers) share one row
        too (`_packed`): the context once, then every answer. Shapes per forward: ids [rows, L] (right-padded),
        logits [positions, vocab] at the predicting positions only.
        """
        for i, (_, ctx, cont) in enumerate(requests):
            if not ctx or not cont:
                raise ValueError(f"request {i}: empty context or continuation (HFLM asserts the same)")
            if len(cont) > self.max_length:
                raise ValueError(f"request {i}: continuation of {len(cont)} tokens > max_length {self.max_length}")
        units, rest = self._packed(requests) if self.share_contexts and self._tailor_model() else ([], list(range(len(requests))))
        index: dict[tuple[int, ...], int] = {}
        for i in rest:  # one causal row per distinct input
            _, ctx, cont = requests[i]
            inp = tuple((ctx + cont)[-(self.max_length + 1):][:-1])
            k = index.setdefault(inp, len(units))
            if k == len(units):
                units.append(_Unit(list(inp), None, []))
            units[k].reqs.append((i, list(range(len(inp) - len(cont), len(inp))), cont))
        # packed rows apart from plain ones: a forward of plain rows keeps the causal kernel (no explicit mask)
        order = sorted(range(len(units)), key=lambda k: (units[k].seg is None, -len(units[k].ids)))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Scoring requests (batched)")
        start = 0
        while start < len(order):
            longest = len(units[order[start]].ids)
            end = start + 1
            while (end < len(order) and (end - start + 1) * longest <= self.batch_tokens
                   and len(units[order[end]].ids) >= self.MIN_FILL * longest
                   and (units[order[end]].seg is None) == (units[order[start]].seg is None)):
                end += 1
            batch = [units[k] for k in order[start:end]]
            done = [i for u in batch for i, _, _ in u.reqs]
            for i, res in zip(done, self._score(batch, longest), strict=True):
                out[i] = res
            start = end
            bar.update(len(done))
        bar.close()
        for (key, _, _), res in zip(requests, out, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return out  # type: ignore[return-value]

    MIN_SHARED = 8  # context tokens worth sharing: a one-token context (the prefix token of every context-free
    # request: CrowS, StereoSet) saves a token per answer and would gather thousands of requests in one group

    def _packed(self, requests: list[Request]) -> tuple[list["_Unit"], list[int]]:
        """Rows that hold a context once and then each of its distinct continuations (all but the last token:
        the context's last position predicts every continuation's first token), each continuation attending to
        the context and to itself only, its positions going on from the context's as if it were alone. For
        requests whose context of >= MIN_SHARED tokens has >= 2 distinct continuations, one of them longer than
        a token, and whose context + continuation fits max_length + 1 (no left cut). A row holds at most
        max_length tokens: a group with more continuations than that takes several rows, each with the context.
        Returns (packed units, the other requests)."""
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        rest = []
        for i, (_, ctx, cont) in enumerate(requests):
            if len(ctx) >= self.MIN_SHARED and len(ctx) + len(cont) <= self.max_length + 1:
                groups[tuple(ctx)].append(i)
            else:
                rest.append(i)
        units = []
        for ctx, members in groups.items():
            conts = list(dict.fromkeys(tuple(requests[i][2]) for i in members))
            if len(conts) < 2 or max(map(len, conts)) < 2:
                rest += members  # nothing to share beyond what one causal row already shares
                continue
            c = len(ctx)
            rows: list[_Unit] = []
            where: dict[tuple[int, ...], tuple[_Unit, list[int]]] = {}
            for cont in conts:  # each fits a row with the context alone (c + len(cont) - 1 <= max_length)
                if not rows or len(rows[-1].ids) + len(cont) - 1 > self.max_length:
                    rows.append(_Unit(list(ctx), [0] * c, [], list(range(c))))
                u = rows[-1]
                where[cont] = (u, [c - 1] + list(range(len(u.ids), len(u.ids) + len(cont) - 1)))
                u.seg += [u.seg[-1] + 1] * (len(cont) - 1)  # ids only grow: the last is the largest
                u.ids += cont[:-1]
                u.positions += range(c, c + len(cont) - 1)  # as if it followed the context alone
            for i in members:
                u, pos = where[tuple(requests[i][2])]
                u.reqs.append((i, pos, requests[i][2]))
            units += rows
        return units, sorted(rest)

    def _tailor_model(self) -> bool:
        return hasattr(self.model, "hidden_states") and hasattr(self.model, "tables")

    def _score(self, units: list["_Unit"], length: int) -> list[tuple[float, bool]]:
        """One forward of `units` right-padded to `length`; per request of each unit in order."""
        dev = self.device
        ids = torch.zeros(len(units), length, dtype=torch.long)
        for r, u in enumerate(units):
            ids[r, :len(u.ids)] = torch.tensor(u.ids)
        positions = mask = None
        if units[0].seg is not None:  # a forward of packed rows (never mixed with plain ones): positions, who sees whom
            seg = torch.full((len(units), length), -1, dtype=torch.long)  # -1: padding
            positions = torch.zeros(len(units), length, dtype=torch.long)
            for r, u in enumerate(units):
                seg[r, :len(u.ids)] = torch.tensor(u.seg)
                positions[r, :len(u.ids)] = torch.tensor(u.positions)
            causal = torch.ones(length, length, dtype=torch.bool).tril()
            sq, sk = seg[:, :, None], seg[:, None, :]
            mask = (causal & ((sk == 0) | (sk == sq))) | torch.eye(length, dtype=torch.bool)  # padding: itself
            positions, mask = positions.to(dev), mask[:, None].to(dev)
        where, tgt, owner, q = [], [], [], 0  # (row, position) whose logits predict each target token; its request
        for r, u in enumerate(units):
            for _, pos, cont in u.reqs:
                where += [(r, p) for p in pos]
                tgt += cont
                owner += [q] * len(cont)
                q += 1
        owner_t = torch.tensor(owner, device=dev)
        tgt_t = torch.tensor(tgt, device=dev)
        rr, pp = torch.tensor(where, device=dev).T
        ll = torch.zeros(q, dtype=torch.float64, device=dev)
        miss = torch.zeros(q, dtype=torch.long, device=dev)  # continuation tokens that are not the argmax
        with torch.no_grad(), torch.autocast(device_type=dev.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            picked = self._picked_logits(ids.to(dev), rr, pp, positions, mask)
            for lo in range(0, len(tgt), self.HEAD_TOKENS):
                sl = slice(lo, lo + self.HEAD_TOKENS)
                z = picked(sl).float()  # [n, vocab]
                t = tgt_t[sl]
                logp = z.gather(-1, t[:, None]).squeeze(-1) - torch.logsumexp(z, dim=-1)
                ll.index_add_(0, owner_t[sl], logp.double())
                miss.index_add_(0, owner_t[sl], (z.argmax(-1) != t).long())
        return list(zip(ll.tolist(), (miss == 0).tolist(), strict=True))

    MIN_FILL = 0.75  # a forward takes no row shorter than this share of its longest: padding stays < 1/3 of
    # the real tokens (on a CPU padding is compute; in session 13 one 16k-token forward of PIQA's quick subset
    # fed 1.8x HFLM's tokens)
    HEAD_TOKENS = 4096  # continuation positions per head matmul: [4096, vocab] fp32 is 0.8 GB at SmolLM2's 49k

    def _picked_logits(self, ids: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
                       positions: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        """A function of a slice of the picked positions -> their logits [n, vocab]. Tailor's models run the
        head at those positions only (the head is ~20% of SmolLM2's FLOPs and [rows, L, vocab] fp32 logits
        would be gigabytes); any other model is called whole, as HFLM does (and is never given packed rows)."""
        m = self.model
        if self._tailor_model():  # TailorForCausalLM: see its forward()
            table, head = m.tables()
            h = m.hidden_states(ids, table, positions, mask)[rows, pos]  # [N, hidden]
            return lambda sl: m.head(h[sl], head)
        if positions is not None or mask is not None:
            raise ValueError(f"packed rows need a Tailor model, not {type(m).__name__}")
        logits = self._model_call(ids)[rows, pos]  # [N, vocab]
        return lambda sl: logits[sl]
