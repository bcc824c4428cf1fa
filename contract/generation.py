"""Dolly's generation settings, part of the model contract beside its prompt: what Dolly's
InstructionTextGenerationPipeline samples with. Serving's defaults, evaluation's, the exported
generation_config.json and the chat page's sliders all start from these. The rule for when an
answer ends is `contract.models.stop_token_ids`."""

TEMPERATURE = 1.0  # 0 is greedy
TOP_P = 0.92  # nucleus sampling mass
TOP_K = 0  # 0: top-k off
MAX_NEW_TOKENS = 256
# Ours, not Dolly's: a stop token is held back until an answer has this many tokens (vLLM's
# min_tokens). An answer of nothing is never what a person asked for, and a lightly tuned model
# sometimes samples `### End` first (seen on `dolly up --smoke`'s model).
MIN_TOKENS = 1
