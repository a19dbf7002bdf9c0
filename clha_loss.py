"""CLHA's training objective (Fang et al., LREC-COLING 2024, Sec. 2.2-2.3, Eqs. 2-7) as pure
tensor functions.

    python -m pytest test_clha.py -k loss     # checks every function here against loops
                                              # written from the equations

Nothing here knows about models, tokenizers or distributed training: tensors in, tensors out,
`torch` only.

Legend for shape comments: B prompts, K candidates per prompt (K >= 2), T tokens, V vocabulary,
N = B * K. Candidates are ordered best first: index 0 is the most preferred (the highest reward
after rescoring).

Paper symbol            -> here
  p_i(x, y_i)   Eq. 3   -> `logps[:, i]`, the mean log-prob of candidate i's response tokens
                           (`sequence_logps`, or `response_logps` from the logits that predict them)
  f_{i<j}       Eq. 4   -> `f[:, i, j]` in `clha_loss`, with the sign corrected (see the note at
                           that line)
  xi_adjust     Eq. 6   -> `margin * (j - i)`; `margin=0` is the paper's "w/o xi_adjust" ablation
  k             Eq. 5   -> `k`: 1 when |r_i - r_j| <= `reward_gap` (the pair is too close to
                           learn from)
  r_phi(x, y)   Eq. 1   -> `rewards`, the reward model's scores for each candidate
  lambda        Eq. 7   -> 1 - `sft_gate`: the SFT term is on only for prompts whose SFT target
                           has reward > 0
  alpha         Eq. 7   -> `alpha`, default 0.05 * (K - 1)^2 (Sec. 3.3)
  L_sft         Eq. 7   -> `sft_loss`: minus the summed token log-probs of the SFT target
  L_pro         Eq. 2   -> `pro_loss`, the PRO baseline

Where the paper is silent, the defaults follow the authors' released code: the pair threshold equals
the margin (3.0), L_sft sums token log-probs (not a mean), and prompts whose SFT term is off still
count in the batch mean. README.md ("Where we differ") lists every such choice.
"""

import math

import torch


def sequence_logps(logits, input_ids, response_mask):
    """Eq. 3 for each sequence: the mean (and sum) log-prob of its response tokens given everything
    before.

    logits [N, T, V] from the model for input_ids [N, T]; response_mask [N, T] bool, True at
    response tokens.
    Token t is predicted by logits[:, t - 1], so the first position can never be a response token.
    Returns (mean_logps [N], sum_logps [N]) in float32 (float64 for float64 logits) whatever the
    dtype of the logits.
    """
    if logits.shape[:2] != input_ids.shape or input_ids.shape != response_mask.shape:
        raise ValueError(f"shapes differ: logits {tuple(logits.shape)}, "
                         f"input_ids {tuple(input_ids.shape)}, "
                         f"response_mask {tuple(response_mask.shape)}; "
                         "expected [N, T, V], [N, T], [N, T]")
    response_mask = response_mask.bool()
    starts_at_zero = response_mask[:, 0].nonzero().flatten().tolist()
    if starts_at_zero:
        raise ValueError(f"rows {starts_at_zero} have a response token at position 0, "
                         "which no logit predicts; every sequence needs at least one prompt token "
                         "(e.g. BOS) before its response")
    empty = (~response_mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"sequences {empty} have no response tokens; Eq. 3 divides by |y_i|, "
                         "which would be 0")
    mask = response_mask[:, 1:]                                   # [N, T-1] response-token targets
    # row-major masking keeps the tokens sequence after sequence, as response_logps wants them
    return response_logps(logits[:, :-1][mask], input_ids[:, 1:][mask], mask.sum(dim=1))


def response_logps(scores, targets, lengths, longest=None):
    """Eq. 3 from the logits that predict the response tokens, whatever the batch's layout was
    (data.policy_logps).

    scores [M, V]: the logits that predict targets [M], the response tokens of N sequences one
    sequence after the other; lengths [N]: how many each sequence has (|y_i| >= 1, summing to M; not
    checked here, where checking would wait for a GPU); longest: the largest of them as a plain
    number, if known (then nothing here waits for a GPU either).
    Returns (mean_logps [N], sum_logps [N]) in float32, or float64 for float64 scores.

    Memory: the one large tensor autograd saves is the float32 [M, V] copy of `scores` (gather and
    logsumexp share it); the token log-prob is the target's logit minus logsumexp, so no [M, V]
    log_softmax is kept. The sum over each sequence's tokens is a plain sum over the rows of an
    [N, max |y|] grid, not an index_add (whose atomic adds on GPUs would make the result depend on
    thread timing).
    """
    # bf16 logits: fp32 log-probs
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    token_logps = (scores.gather(1, targets[:, None]).squeeze(1)
                   - scores.logsumexp(dim=1))                              # [M] Eq. (3) log P
    N, M = len(lengths), len(targets)
    sequence = (torch.arange(N, device=lengths.device)
                .repeat_interleave(lengths, output_size=M))                # [M]
    place = (torch.arange(M, device=lengths.device)
             - (lengths.cumsum(0) - lengths)[sequence])                    # [M]
    grid = token_logps.new_zeros(N, longest or int(lengths.max()))         # [N, max |y|]
    sum_logps = grid.index_put((sequence, place), token_logps).sum(dim=1)  # [N] Eq. (3) sum
    mean_logps = sum_logps / lengths                                       # [N] Eq. (3)
    return mean_logps, sum_logps


def _kept_pairs(rewards, reward_gap, K, device):
    """[B, K, K] float: 1 where i < j and the pair is learned from, i.e. (1 - k) of Eq. 5 on the
    upper triangle."""
    upper = torch.ones(K, K, device=device).triu(diagonal=1)      # [K, K] pairs i < j
    if reward_gap is None:                                        # "w/o Rescore": every pair counts
        return upper.expand(1, K, K)
    gap = (rewards[:, :, None] - rewards[:, None, :]).abs()       # [B, K, K] |r_i - r_j|
    k = (gap <= reward_gap).float()                               # [B, K, K] Eq. (5): 1 = too close
    return (1 - k) * upper                                        # [B, K, K] Eq. (5) (1 - k), i < j


def clha_loss(logps, rewards, margin=3.0, reward_gap=3.0, reduction="paper"):
    """Eqs. 4-6: the pairwise contrastive loss with a rank-dependent margin, ignoring pairs of close
    reward.

    logps [B, K] mean log-probs (Eq. 3), best candidate first; rewards [B, K] (unused when
    reward_gap is None).
    reduction="paper": Eq. 5's sum over the pairs of each prompt, then the mean over the B prompts.
    reduction="official": what the authors' code computes: for each rank distance d = j - i, the
    mean over the kept pairs at that distance in the whole batch (nothing if none is kept, as
    there), then the sum over d.
    """
    B, K = logps.shape
    if reduction not in ("paper", "official"):
        raise ValueError(f"reduction={reduction!r}: use 'paper' or 'official'")
    if reward_gap is not None and (rewards is None or rewards.shape != logps.shape):
        raise ValueError(f"rewards must have the shape of logps {tuple(logps.shape)} "
                         "when reward_gap is set; "
                         "pass reward_gap=None to keep every pair (the 'w/o Rescore' ablation)")
    rank = torch.arange(K, device=logps.device, dtype=logps.dtype)
    distance = rank[None, :] - rank[:, None]                      # [K, K] j - i
    xi_adjust = margin * distance                                 # [K, K] Eq. (6)
    # Eq. 4 is printed as p_i - p_j + xi; minimising that would push the preferred candidate
    # i *down*. The text (lower index = more preferred) and the authors'
    # MarginRankingLoss(target=+1) both mean:
    f = logps[:, None, :] - logps[:, :, None] + xi_adjust         # [B, K, K] Eq. (4) p_j - p_i + xi
    kept = _kept_pairs(rewards, reward_gap, K, logps.device)      # [B or 1, K, K] (1 - k) for i < j
    terms = (kept * f).clamp(min=0)                               # [B, K, K] Eq. (5) max{0, (1-k)f}
    if reduction == "paper":
        return terms.sum(dim=(1, 2)).mean()                       # Eq. (5) per prompt, mean over B
    kept = kept.expand(B, K, K)
    loss = logps.new_zeros(())
    for d in range(1, K):
        at_d = distance == d                                      # [K, K] the pairs (i, i + d)
        n_kept = kept[:, at_d].sum()
        loss = loss + terms[:, at_d].sum() / n_kept.clamp(min=1)  # mean over kept pairs, distance d
    return loss


def sft_loss(sum_logps, rewards, gate=True):
    """Eq. 7's gated SFT term on each prompt's SFT target:
    -(1/B) sum_b (1 - lambda_b) * sum_logps_b.

    sum_logps [B] summed token log-probs of each prompt's SFT target;
    rewards [B] that target's reward.
    gate=True: (1 - lambda_b) = 1 when the reward is > 0, else 0 (Sec. 2.3); gate=False: always 1.
    Gated-out prompts still count in B, as in the authors' code.
    """
    sft_gate = ((rewards > 0).float() if gate
                else torch.ones_like(sum_logps))                  # [B] 1 - lambda, Eq. (7)
    return -(sft_gate * sum_logps).mean()                         # Eq. (7) L_sft


def pro_loss(logps):
    """Eq. 2, PRO's listwise loss: sum over k < K of -log(exp(p_k) / sum_{i >= k} exp(p_i)),
    mean over B.

    logps [B, K], best first.
    As printed in the CLHA paper: no reward temperature (PRO's own code has one).
    """
    B, K = logps.shape
    rank = torch.arange(K, device=logps.device)
    later = rank[None, :] >= rank[:, None]                        # [K, K] later[k, i]: i >= k
    scores = logps[:, None, :].masked_fill(~later, -math.inf)     # [B, K, K] row k: p_k .. p_{K-1}
    log_denominator = scores.logsumexp(dim=2)                     # [B, K] log sum_{i >= k} exp(p_i)
    return (log_denominator - logps)[:, :-1].sum(dim=1).mean()    # Eq. (2), paper's k = 1 .. K-1


def clha_objective(logps, sum_logps, rewards, sft_index, *, loss="clha", alpha=None, margin=3.0,
                   reward_gap=3.0, sft_gate=True, reduction="paper"):
    """Eq. 7, L_total = L_clha + alpha (1 - lambda) L_sft, and the metrics worth watching while
    training.

    logps [B, K] mean log-probs (Eq. 3), sum_logps [B, K] summed log-probs, rewards [B, K] or None,
    sft_index [B] which candidate is each prompt's SFT target (0 after rescoring).
    loss: "clha" (Eq. 7), "pro" (Eq. 2 + alpha * ungated L_sft, PRO's recipe), "sft" (gated
    L_sft alone: the paper's "w/o L_clha"; pass sft_gate=False for the plain SFT baseline).
    The "w/o Rescore" ablation is reward_gap=None, sft_gate=False; "w/o xi_adjust" is margin=0.
    Returns (loss, metrics): metrics are detached 0-dim tensors, and "logp_rank" [K].
    """
    B, K = logps.shape
    if loss not in ("clha", "pro", "sft"):
        raise ValueError(f"loss={loss!r}: use 'clha', 'pro' or 'sft'")
    if alpha is None:
        alpha = 0.05 * (K - 1) ** 2                               # Sec. 3.3, alpha = 0.05 (l - 1)^2
    gate = sft_gate and loss != "pro"                             # PRO's SFT term has no gate
    if gate and rewards is None:
        raise ValueError("the SFT gate needs rewards: rescore the data first, "
                         "or pass sft_gate=False")
    batch = torch.arange(B, device=logps.device)
    target_sum_logps = sum_logps[batch, sft_index]                # [B]
    target_rewards = rewards[batch, sft_index] if gate else None  # [B]
    loss_sft = sft_loss(target_sum_logps, target_rewards, gate=gate)
    if loss == "clha":
        loss_rank = clha_loss(logps, rewards, margin, reward_gap, reduction)
        total = loss_rank + alpha * loss_sft                      # Eq. (7)
    elif loss == "pro":
        loss_rank = pro_loss(logps)
        total = loss_rank + alpha * loss_sft                      # PRO: Eq. (2) + alpha * L_sft
    else:
        loss_rank = logps.new_zeros(())
        total = alpha * loss_sft                                  # "w/o L_clha": Eq. (7) SFT alone

    with torch.no_grad():
        upper = (torch.ones(K, K, device=logps.device)
                 .triu(diagonal=1).bool())                        # [K, K] the P pairs i < j
        kept = _kept_pairs(rewards, reward_gap if rewards is not None else None, K, logps.device)
        kept = kept.expand(B, K, K)[:, upper]                                  # [B, P] (1 - k)
        correct = (logps[:, :, None] > logps[:, None, :])[:, upper].float()    # [B, P] p_i > p_j
        metrics = {
            "loss": total.detach(),
            "loss_rank": loss_rank.detach(),
            "loss_sft": loss_sft.detach(),
            # share of pairs with |r_i - r_j| > reward_gap
            "pairs_kept": kept.mean(),
            # share of prompts whose SFT term is on (1 - lambda = 1)
            "sft_on": (target_rewards > 0).float().mean() if gate else logps.new_ones(()),
            "acc": correct.mean(),                                # pairwise accuracy over all pairs
            "acc_kept": ((correct * kept).sum()
                         / kept.sum().clamp(min=1)),              # ... over kept pairs (0 if none)
            "logp_rank": logps.detach().mean(dim=0),              # [K] mean log-prob per rank
        }
    return total, metrics
