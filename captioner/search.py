"""Caption search over a decoder's logits, batched across images, with transformers 4.15's exact rules.

The original BLIP called `generate()` of transformers 4.15; newer versions changed the beam length
normalisation and stopping rule, so the two searches are written out here. Both take any decoder that
follows `IncrementalDecoder` and return, per image, the ids 4.15 returned (prompt ids first).

Rules reproduced (4.15 names in quotes):
- lengths count the prompt ids; [SEP] (eos) is forbidden while the sequence is shorter than min_length
  ("MinLengthLogitsProcessor", applied to log-probs AFTER log_softmax, so they are not renormalised);
  the search stops when a sequence reaches max_length ("MaxLengthCriteria").
- beam search ("BeamSearchScorer"): top 2*num_beams of beam_score + log p over all beams' tokens;
  an eos candidate ranked within the first num_beams ends a hypothesis scored sum_logprobs / len, with len
  the id count before the eos; other candidates fill the next num_beams beams. An image is done once
  num_beams hypotheses exist and the best candidate's sum / cur_len cannot beat the worst of them
  (early_stopping=False). Beams still running at max_length are scored sum / max_length.
- greedy ("greedy_search"): argmax of the masked logits; a row stops at eos.
Every image runs its own beams; finished images leave the batch, which does not change any result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

# 4.15 starts beams 1.. at this score so the first step expands beam 0 only (all beams are equal then).
_INITIAL_OTHER_BEAM_SCORE = -1e9


class IncrementalDecoder(Protocol):
    """A text decoder holding one cached row per running sequence."""

    device: torch.device

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Feed new ids (rows, t), int64; return the last position's logits (rows, vocab)."""
        ...

    def select_rows(self, rows: torch.Tensor) -> None:
        """Re-index the cached rows: new row i continues old row rows[i] (reorder, repeat or drop)."""
        ...


class _FinishedHypotheses:
    """4.15's `BeamHypotheses` for one image: the num_beams best finished sequences, length-normalised."""

    def __init__(self, num_beams: int):
        self.num_beams = num_beams
        self.beams: list[tuple[float, list[int]]] = []
        self.worst_score = 1e9

    def add(self, ids: list[int], sum_logprobs: float) -> None:
        score = sum_logprobs / len(ids)
        if len(self.beams) < self.num_beams or score > self.worst_score:
            self.beams.append((score, ids))
            if len(self.beams) > self.num_beams:
                ranked = sorted((s, index) for index, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, cur_len: int) -> bool:
        return len(self.beams) >= self.num_beams and self.worst_score >= best_sum_logprobs / cur_len

    def best(self) -> list[int]:
        # A stable sort then pop(): among equal scores the one added last wins, as in 4.15's finalize.
        return sorted(self.beams, key=lambda beam: beam[0])[-1][1]


def _check_lengths(prompt_ids: Sequence[int], max_length: int) -> None:
    if len(prompt_ids) >= max_length:
        raise ValueError(f"max_length {max_length} leaves no room after the {len(prompt_ids)} prompt ids")


def _next_beams(
    finished: _FinishedHypotheses,
    candidates: list[tuple[int, int, float]],
    sequences: list[list[int]],
    num_beams: int,
    eos_token_id: int,
    cur_len: int,
) -> list[tuple[int, int, float]] | None:
    """One image's step of 4.15's `BeamSearchScorer.process`.

    candidates: its top 2*num_beams (source row, token, sum of log-probs), best first.
    Eos candidates ranked within num_beams become finished hypotheses; the first num_beams other candidates
    are returned as the next beams, or None when the image is done.
    """
    next_beams = []
    for rank, (row, token, score) in enumerate(candidates):
        if token == eos_token_id:
            if rank < num_beams:
                finished.add(sequences[row], score)
        else:
            next_beams.append((row, token, score))
        if len(next_beams) == num_beams:
            break
    best_score = max(score for _, _, score in candidates)
    return None if finished.is_done(best_score, cur_len) else next_beams


def beam_search(
    decoder: IncrementalDecoder,
    prompt_ids: Sequence[int],
    batch_size: int,
    num_beams: int,
    max_length: int,
    min_length: int,
    eos_token_id: int,
) -> list[list[int]]:
    """Beam search (transformers 4.15 BeamSearchScorer, length_penalty 1, early_stopping False).

    decoder: holds batch_size rows of cached context (one per image) before the first call.
    prompt_ids: ids every image's caption starts from (already in the decoder's vocabulary).
    Returns per image the best sequence: prompt ids, new ids, and eos if it stopped before max_length.
    """
    _check_lengths(prompt_ids, max_length)
    device = decoder.device
    prompt = torch.tensor([list(prompt_ids)] * batch_size, dtype=torch.long, device=device)
    logits = decoder(prompt)  # (B, V)
    first_rows = torch.arange(batch_size, device=device).repeat_interleave(num_beams)
    decoder.select_rows(first_rows)
    logits = logits[first_rows]  # (B * num_beams, V)
    sequences = prompt[first_rows]  # (B * num_beams, cur_len)
    beam_scores = torch.zeros(batch_size, num_beams, device=device)
    beam_scores[:, 1:] = _INITIAL_OTHER_BEAM_SCORE
    finished = [_FinishedHypotheses(num_beams) for _ in range(batch_size)]
    running = list(range(batch_size))  # image index of each slot; slot s owns rows s*num_beams ...
    cur_len = len(prompt_ids)
    while True:
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        if cur_len < min_length:
            log_probs[:, eos_token_id] = -float("inf")
        vocab_size = log_probs.shape[-1]
        candidates = (log_probs + beam_scores.view(-1, 1)).view(len(running), num_beams * vocab_size)
        top_scores, top_indices = candidates.topk(2 * num_beams, dim=1, largest=True, sorted=True)
        top_scores_list = top_scores.tolist()
        top_beams = (top_indices // vocab_size).tolist()
        top_tokens = (top_indices % vocab_size).tolist()
        sequences_list = sequences.tolist()

        next_beams: list[tuple[int, int, float]] = []  # (source row, token, score) per new row
        still_running: list[int] = []
        for slot, image in enumerate(running):
            candidates_of_image = [
                (slot * num_beams + beam, token, score)
                for beam, token, score in zip(top_beams[slot], top_tokens[slot], top_scores_list[slot], strict=True)
            ]
            beams = _next_beams(finished[image], candidates_of_image, sequences_list, num_beams, eos_token_id, cur_len)
            if beams is not None:
                next_beams += beams
                still_running.append(image)

        running = still_running
        if not running:
            break
        next_rows, next_tokens, next_scores = zip(*next_beams, strict=True)
        rows = torch.tensor(next_rows, device=device)
        tokens = torch.tensor(next_tokens, device=device)
        sequences = torch.cat([sequences[rows], tokens[:, None]], dim=1)
        beam_scores = torch.tensor(next_scores, device=device).view(len(running), num_beams)
        cur_len += 1
        if cur_len >= max_length:
            break
        decoder.select_rows(rows)
        logits = decoder(tokens[:, None])

    # Beams still running at max_length compete with the finished ones (4.15's finalize).
    sequences_list, scores_list = sequences.tolist(), beam_scores.view(-1).tolist()
    for slot, image in enumerate(running):
        for beam in range(num_beams):
            row = slot * num_beams + beam
            finished[image].add(sequences_list[row], scores_list[row])
    best = [hypotheses.best() for hypotheses in finished]
    return [ids + [eos_token_id] if len(ids) < max_length else ids for ids in best]


def greedy_search(
    decoder: IncrementalDecoder,
    prompt_ids: Sequence[int],
    batch_size: int,
    max_length: int,
    min_length: int,
    eos_token_id: int,
) -> list[list[int]]:
    """Greedy decoding (transformers 4.15 greedy_search): argmax each step; a sequence ends at eos.

    Same decoder contract and return value as `beam_search` (prompt ids, new ids, eos if stopped early).
    """
    _check_lengths(prompt_ids, max_length)
    device = decoder.device
    sequences = [list(prompt_ids) for _ in range(batch_size)]
    logits = decoder(torch.tensor(sequences, dtype=torch.long, device=device))
    running = list(range(batch_size))
    cur_len = len(prompt_ids)
    while True:
        logits = logits.float()
        if cur_len < min_length:
            logits[:, eos_token_id] = -float("inf")
        tokens = logits.argmax(dim=-1).tolist()
        keep = []
        for slot, (image, token) in enumerate(zip(running, tokens, strict=True)):
            sequences[image].append(token)
            if token != eos_token_id:
                keep.append(slot)
        cur_len += 1
        if not keep or cur_len >= max_length:
            return sequences
        running = [running[slot] for slot in keep]
        decoder.select_rows(torch.tensor(keep, device=device))
        logits = decoder(torch.tensor([[sequences[image][-1]] for image in running], device=device))
