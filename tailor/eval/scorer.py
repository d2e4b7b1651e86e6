"""lm-eval's HFLM with its log-likelihood loop batched: the same numbers, without per-request Python.

HFLM scores a multiple-choice request in Python: one `tokenizer.encode` per string, one tensor per request,
and after each forward a loop that slices, argmaxes and `.item()`s one request at a time (a GPU sync per
request). On an H200 the 135M model's full-profile suite ran at ~200 requests/s whatever the token count
(reports/bench/evaluate.json: 419 s per model, CPU-seconds equal to wall seconds). `BatchedHFLM` keeps
everything lm-eval decides -- requests, the context/continuation split (`TemplateLM._encode_pair`), left
truncation to `max_length`, the rolling windows of perplexity, the aggregation -- and changes only how the
numbers are computed:

- every distinct string is tokenized once, in batched calls of the fast tokenizer;
- requests are sorted by length and packed into forwards of at most `batch_tokens` padded tokens, rows of
  similar length together (`MIN_FILL`);
- the log-softmax is taken only at continuation positions, in float32, and the sums, the greedy check and
  the copy to the host happen once per forward.

Results equal HFLM's to float rounding (tests/unit/test_eval_scorer.py compares both on every request kind).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import _add_special_kwargs, has_bos_prefix
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

Request = tuple[Any, list[int], list[int]]  # (cache key, context tokens, continuation tokens)


class BatchedHFLM(HFLM):
    """HFLM (causal backend) whose loglikelihood / loglikelihood_rolling are batched end to end.

    batch_tokens: padded tokens per forward (rows x longest row); one row longer than that runs alone.
    Other arguments are HFLM's.
    """

    def __init__(self, *args: Any, batch_tokens: int = 32768, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.backend != "causal":
            raise ValueError(f"BatchedHFLM scores causal models only, not backend={self.backend!r}")
        if batch_tokens <= 0:
            raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
        self.batch_tokens = batch_tokens
        self._bos_str = self.tokenizer.decode(self.prefix_token_id)

    # -- tokenization: HFLM.tok_encode's rules, one batched call per distinct kwargs --------------------------
    def encode_many(self, strings: list[str], add_special_tokens: bool | None = None) -> dict[str, list[int]]:
        """{string: token ids} exactly as `tok_encode(string, add_special_tokens)` gives them."""
        groups: dict[tuple, list[str]] = defaultdict(list)
        for s in dict.fromkeys(strings):
            kw = _add_special_kwargs(add_special_tokens, self.add_bos_token)
            if add_special_tokens is None and has_bos_prefix(s, self._bos_str):
                kw["add_special_tokens"] = False  # the string already starts with BOS (HFLM.tok_encode)
            groups[tuple(sorted(kw.items()))].append(s)
        out: dict[str, list[int]] = {}
        for kw, group in groups.items():
            ids = self.tokenizer(group, **dict(kw))["input_ids"]
            out.update(zip(group, ids, strict=True))
        return out

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """TemplateLM.loglikelihood's context/continuation split, tokenized in batches."""
        pairs = [req.args for req in requests]
        split = []  # (context, continuation) after moving the context's trailing spaces (TemplateLM._encode_pair)
        for context, continuation in pairs:
            n = len(context) - len(context.rstrip())
            split.append((context[:-n], context[-n:] + continuation) if n and context else (context, continuation))
        full = self.encode_many([c + x for c, x in split if c])
        ctx = self.encode_many([c for c, _ in split if c])
        bare = self.encode_many([x for c, x in split if not c], add_special_tokens=False)
        reqs: list[Request] = []
        for (context, continuation), (c, x) in zip(pairs, split, strict=True):
            if c:
                ce = ctx[c]
                reqs.append(((context, continuation), ce, full[c + x][len(ce):]))
            else:  # no context: the prefix token (BOS) conditions the continuation (TemplateLM.loglikelihood)
                xe = bare[x]
                ce, xe = ([self.prefix_token_id], xe) if self.prefix_token_id != xe[0] else (xe[:1], xe[1:])
                reqs.append(((context, continuation), ce, xe))
        return self._loglikelihood_tokens(reqs, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Perplexity windows as HFLM.loglikelihood_rolling makes them, all scored in one batched pass."""
        texts = [req.args[0] for req in requests]
        enc = self.encode_many(texts)
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
        len(continuation) positions predict the continuation. Shapes per forward: ids [rows, L] (right-padded),
        picked logits [rows, C, vocab] with C the longest continuation of the forward.
        """
        rows = []
        for i, (_, ctx, cont) in enumerate(requests):
            if not ctx or not cont:
                raise ValueError(f"request {i}: empty context or continuation (HFLM asserts the same)")
            if len(cont) > self.max_length:
                raise ValueError(f"request {i}: continuation of {len(cont)} tokens > max_length {self.max_length}")
            rows.append(((ctx + cont)[-(self.max_length + 1):][:-1], cont))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        bar = tqdm(total=len(rows), disable=disable_tqdm or self.rank != 0, desc="Scoring requests (batched)")
        start = 0
        while start < len(order):
            longest = len(rows[order[start]][0])
            end = start + 1
            while (end < len(order) and (end - start + 1) * longest <= self.batch_tokens
                   and len(rows[order[end]][0]) >= self.MIN_FILL * longest):
                end += 1
            batch = order[start:end]
            n = len(batch)
            for i, res in zip(batch, self._score(batch, rows, longest), strict=True):
                out[i] = res
            start += n
            bar.update(n)
        bar.close()
        for (key, _, _), res in zip(requests, out, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return out  # type: ignore[return-value]

    def _score(self, batch: list[int], rows: list[tuple[list[int], list[int]]], length: int) -> list[tuple[float, bool]]:
        dev = self.device
        ids = torch.zeros(len(batch), length, dtype=torch.long)
        where, tgt = [], []  # (row, position) whose logits predict each continuation token, and that token
        for r, i in enumerate(batch):
            inp, cont = rows[i]
            ids[r, :len(inp)] = torch.tensor(inp)
            where += [(r, p) for p in range(len(inp) - len(cont), len(inp))]
            tgt += cont
        owner = torch.tensor([r for r, _ in where], device=dev)
        tgt_t = torch.tensor(tgt, device=dev)
        rr, pp = torch.tensor(where, device=dev).T
        ll = torch.zeros(len(batch), dtype=torch.float64, device=dev)
        miss = torch.zeros(len(batch), dtype=torch.long, device=dev)  # continuation tokens that are not the argmax
        with torch.no_grad(), torch.autocast(device_type=dev.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            picked = self._picked_logits(ids.to(dev), rr, pp)
            for lo in range(0, len(tgt), self.HEAD_TOKENS):
                sl = slice(lo, lo + self.HEAD_TOKENS)
                z = picked(sl).float()  # [n, vocab]
                t = tgt_t[sl]
                logp = z.gather(-1, t[:, None]).squeeze(-1) - torch.logsumexp(z, dim=-1)
                ll.index_add_(0, owner[sl], logp.double())
                miss.index_add_(0, owner[sl], (z.argmax(-1) != t).long())
        return list(zip(ll.tolist(), (miss == 0).tolist(), strict=True))

    MIN_FILL = 0.75  # a forward takes no row shorter than this share of its longest: padding stays < 1/3 of
    # the real tokens (on a CPU padding is compute; in session 13 one 16k-token forward of PIQA's quick subset
    # fed 1.8x HFLM's tokens)
    HEAD_TOKENS = 4096  # continuation positions per head matmul: [4096, vocab] fp32 is 0.8 GB at SmolLM2's 49k

    def _picked_logits(self, ids: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor):
        """A function of a slice of the picked positions -> their logits [n, vocab]. Tailor's models run the
        head at those positions only (the head is ~20% of SmolLM2's FLOPs and [rows, L, vocab] fp32 logits
        would be gigabytes); any other model is called whole, as HFLM does."""
        m = self.model
        if hasattr(m, "hidden_states") and hasattr(m, "tables"):  # TailorForCausalLM: see its forward()
            table, head = m.tables()
            h = m.hidden_states(ids, table)[rows, pos]  # [N, hidden]
            return lambda sl: m.head(h[sl], head)
        logits = self._model_call(ids)[rows, pos]  # [N, vocab]
        return lambda sl: logits[sl]
