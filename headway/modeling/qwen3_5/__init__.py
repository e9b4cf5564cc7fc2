"""The Qwen3.5 family (text): a hybrid of Gated DeltaNet linear attention and gated full attention.

- `config.py`      `Qwen35Config`: both layouts a user meets (a text-only directory,
                   `model_type: qwen3_5_text`, and the released multimodal snapshot,
                   `model_type: qwen3_5` with its `text_config`); no torch
- `delta_rule.py`  the gated delta rule: recurrent (the reference), chunked (training,
                   prefill) and one in-place step (decode)
- `state.py`       `LinearAttentionState`: a linear-attention layer's per-row sampling state
- `model.py`       the blocks and `Qwen35Model`

Registered in `headway.modeling.families`. Images are not supported: the vision tower and the
multi-token-prediction weights of a multimodal snapshot are not loaded.
"""
