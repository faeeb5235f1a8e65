"""Column names of label and hidden-state shards shared by every top-k codec.

The top-k columns themselves belong to the codec that stores them
(:mod:`labelgen.contract.codecs`); ``TOPK_IDS`` / ``TOPK_LOGPROBS`` are the *decoded*
layout (ids and raw log-probs by rank), which the plain codec stores as is.
"""

from __future__ import annotations

__all__ = ["Columns"]


class Columns:
    """Column names of a label shard, with their per-row lengths (T tokens, k top-k width)."""

    SAMPLE_ID = "sample_id"  # string: "<source>#<record>.<chunk>" of the sequence's first token
    TOKEN_HASH = "token_hash"  # uint64: token_hash(input_ids), to join other products safely
    NUM_TOKENS = "num_tokens"  # int32: T
    INPUT_IDS = "input_ids"  # list<int32> [T]
    LABEL_MASK = "label_mask"  # list<uint8> [T-1]: 1 where token t+1 is a training target
    TOPK_IDS = "topk_ids"  # decoded: list<int32> [(T-1) * k], sorted by rank per position
    TOPK_LOGPROBS = "topk_logprobs"  # decoded: list<float32> [(T-1) * k], descending per position
    TARGET_LOGPROBS = "target_logprobs"  # list<float32> [T-1]: log p(token t+1)
    # Random-sampling labels (product "draws"): per position t, DRAW_NUM[t] unique ids.
    DRAW_NUM = "draw_num"  # list<uint8> [T-1]
    DRAW_IDS = "draw_ids"  # list<int32> [sum draw_num], ascending per position
    DRAW_COUNTS = "draw_counts"  # list<uint8> [sum draw_num]: times each id was drawn
    # Hidden-state shards (product "hidden"), one row per sequence:
    HIDDEN_POSITIONS = "positions"  # list<int32> [P]: sampled token positions
    HIDDEN_LAYER = "layer_{}"  # binary: P x D little-endian float16/bfloat16/float32
