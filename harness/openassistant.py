"""OpenAssistant's reward models, the paper's two (Sec. 2.1): GPT-NeoX of model type
gpt_neox_reward_model, which stock transformers cannot load. They are defined here, so that no code
of theirs runs (trust_remote_code stays False); importing this module registers them, which
rescore.py does (and through it evaluate.py), train.py not: a policy must be a causal LM.
"""

import torch
from transformers import (AutoConfig, AutoModelForSequenceClassification, GPTNeoXConfig,
                          GPTNeoXModel, GPTNeoXPreTrainedModel)
from transformers.modeling_outputs import SequenceClassifierOutput


class GPTNeoXRewardConfig(GPTNeoXConfig):
    model_type = "gpt_neox_reward_model"
    pooling: str = "last"          # the hidden state of the last attended token goes to the head


class GPTNeoXRewardModel(GPTNeoXPreTrainedModel):
    """GPT-NeoX and a linear head on one pooled hidden state, weights named as OpenAssistant's."""
    config_class = GPTNeoXRewardConfig

    def __init__(self, config):
        super().__init__(config)
        if config.pooling != "last":   # OpenAssistant also trained "mean"; the paper's two: "last"
            raise ValueError(f"pooling {config.pooling!r} is not supported: only 'last'")
        self.gpt_neox = GPTNeoXModel(config)
        self.out_proj = torch.nn.Linear(config.hidden_size, 1)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        out = self.gpt_neox(input_ids, attention_mask=attention_mask, **kwargs)
        hidden = out.last_hidden_state                                                   # [N, T, H]
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask     # [N, T]
        last = mask.long().cumsum(1).argmax(1)  # [N] where the attended count first peaks: the last
        pooled = hidden[torch.arange(len(hidden), device=hidden.device), last]              # [N, H]
        return SequenceClassifierOutput(logits=self.out_proj(pooled))                       # [N, 1]


# exist_ok: `python rescore.py` runs as __main__, and a module it imports may import this one again
AutoConfig.register("gpt_neox_reward_model", GPTNeoXRewardConfig, exist_ok=True)
AutoModelForSequenceClassification.register(GPTNeoXRewardConfig, GPTNeoXRewardModel,
                                            exist_ok=True)
