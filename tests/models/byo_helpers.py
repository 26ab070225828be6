"""Tiny "bring your own" inputs: a save_pretrained MoE checkpoint on random weights with a word-level
tokenizer (and a chat template) saved next to it, and small classification / generative data files.

``python -m tests.models.byo_helpers DIR`` writes ``DIR/ckpt`` (Mixtral), ``DIR/reviews.jsonl``
and ``DIR/qa.jsonl``: the inputs of the docs/models.md example."""
from __future__ import annotations

import json
import random
import sys
import warnings
from pathlib import Path

import torch

WORDS = ("the a this that film movie book song plot cast acting music story ending was is felt "
         "very really quite so good great fine lovely superb bad awful poor dull boring "
         "what colour sky grass sun snow blue green yellow white cat dog says meow woof").split()
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")
POSITIVE, NEGATIVE = ("good", "great", "fine", "lovely", "superb"), ("bad", "awful", "poor", "dull", "boring")
FACTS = {"sky": "blue", "grass": "green", "sun": "yellow", "snow": "white"}
SOUNDS = {"cat": "meow", "dog": "woof"}

# tiny shapes per family (sizes follow tests/moe/helpers.py)
FAMILY_CONFIGS = {
    "mixtral": dict(model_type="mixtral", hidden_size=32, intermediate_size=16, num_local_experts=4,
                    num_experts_per_tok=2),
    "qwen2_moe": dict(model_type="qwen2_moe", hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                      shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False),
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                      num_experts=4, num_experts_per_tok=2, head_dim=8),
    "olmoe": dict(model_type="olmoe", hidden_size=32, intermediate_size=16, num_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(model_type="deepseek_v3", hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                        n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                        num_hidden_layers=3, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16,
                        qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_shared_experts=1),
}


def tiny_tokenizer(chat_template: bool = True):
    """A ``PreTrainedTokenizerFast``: word-level vocabulary of :data:`WORDS`, pad/unk/bos/eos and
    the chat tokens as specials, optionally with :data:`CHAT_TEMPLATE`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                 eos_token="<eos>", additional_special_tokens=SPECIALS[4:])
    if chat_template:
        hf.chat_template = CHAT_TEMPLATE
    return hf


def tiny_lm(family: str = "mixtral", *, vocab_size: int = 64, seed: int = 0, **overrides):
    """A random-weight ``*ForCausalLM`` of ``family`` (fp32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                initializer_range=0.1, max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0,
                bos_token_id=2, eos_token_id=3)
    spec.update(FAMILY_CONFIGS[family])
    spec.update(overrides)
    model_type = spec.pop("model_type")
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **spec)).float()


def save_checkpoint(path, family: str = "mixtral", *, tokenizer: bool = True, chat_template: bool = True,
                    vocab_size: int = 64, seed: int = 0) -> Path:
    """``save_pretrained`` a tiny model (and the tiny tokenizer) into ``path``."""
    path = Path(path)
    lm = tiny_lm(family, vocab_size=vocab_size, seed=seed)
    lm.save_pretrained(path)
    if tokenizer:
        tiny_tokenizer(chat_template).save_pretrained(path)
    return path


def expert_tensor_names(ckpt) -> set[str]:
    """The names, in the saved format of checkpoint ``ckpt``, of the tensors that hold routed-expert
    weights (what ``flux.patch`` calls experts): every expert parameter is shifted, the model saved
    again, and the changed tensors are the answer (families save experts under their own names)."""
    import tempfile

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import flux

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = AutoModelForCausalLM.from_pretrained(str(ckpt))
    handle = flux.patch(lm)
    with torch.no_grad():
        for layer in handle.moe_layers:
            for p in layer.source.expert_parameters():
                p.add_(1.0)
    handle.restore()
    with tempfile.TemporaryDirectory() as tmp:
        lm.save_pretrained(tmp)
        after = {k: v for f in sorted(Path(tmp).glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    before = {k: v for f in sorted(Path(ckpt).glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    return {k for k in before if not torch.equal(before[k].float(), after[k].float())}


_REMOTE_WRAPPER = '''

# ---- the remote-code checkpoint of tests/models/byo_helpers.py: a base model + LM head layout
from transformers.modeling_outputs import BaseModelOutput


class DeepseekV1Model(PreTrainedModel):
    config_class = DeepseekV1Config

    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def _init_weights(self, module):
        DeepseekV1ForCausalLM._init_weights(self, module)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h)
        return BaseModelOutput(last_hidden_state=self.norm(h))


class DeepseekV1RemoteForCausalLM(PreTrainedModel):
    config_class = DeepseekV1Config
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.model = DeepseekV1Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        DeepseekV1ForCausalLM._init_weights(self, module)

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        logits = self.lm_head(self.model(input_ids, attention_mask).last_hidden_state)
        return CausalLMOutput(logits=logits)
'''


def save_remote_code_checkpoint(path, *, seed: int = 0) -> Path:
    """A checkpoint whose model code ships with it (``auto_map``): tests/moe/deepseek_v1.py's
    DeepSeek-MoE v1 layout (``nn.ModuleList`` experts, as its hub remote code), with a base model
    under ``.model``; loading it needs ``trust_remote_code``.  The tiny tokenizer is saved too."""
    import importlib.util
    import tempfile

    path = Path(path)
    source = (Path(__file__).resolve().parents[1] / "moe" / "deepseek_v1.py").read_text() + _REMOTE_WRAPPER
    with tempfile.TemporaryDirectory() as tmp:
        module_file = Path(tmp) / "modeling_deepseek_v1_test.py"
        module_file.write_text(source)
        spec = importlib.util.spec_from_file_location("modeling_deepseek_v1_test", module_file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
            module.DeepseekV1Config.register_for_auto_class()
            module.DeepseekV1RemoteForCausalLM.register_for_auto_class("AutoModelForCausalLM")
            torch.manual_seed(seed)
            config = module.DeepseekV1Config(vocab_size=64, pad_token_id=0, bos_token_id=2, eos_token_id=3)
            module.DeepseekV1RemoteForCausalLM(config).float().save_pretrained(path)
        finally:
            sys.modules.pop(spec.name, None)
    tiny_tokenizer().save_pretrained(path)
    return path


def classification_rows(n: int = 96, seed: int = 0) -> list[dict]:
    """Reviews labelled ``pos`` / ``neg`` by their adjective, with a ``genre`` domain column."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        adj = rng.choice(POSITIVE if label == "pos" else NEGATIVE)
        noun = rng.choice(("film", "movie", "book", "song"))
        part = rng.choice(("plot", "cast", "acting", "music", "story", "ending"))
        text = f"the {noun} was {rng.choice(('very', 'really', 'quite', 'so'))} {adj} and the {part} felt {adj}"
        rows.append({"text": text, "label": label, "genre": noun})
    return rows


def generative_rows(n: int = 96, seed: int = 0) -> list[dict]:
    """Question -> one-word answer pairs, with a ``topic`` domain column (colours / sounds)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if i % 2 == 0:
            thing = rng.choice(sorted(FACTS))
            rows.append({"prompt": f"what colour is the {thing}", "response": FACTS[thing], "topic": "colour"})
        else:
            animal = rng.choice(sorted(SOUNDS))
            rows.append({"prompt": f"what says the {animal}", "response": f"the {animal} says {SOUNDS[animal]}",
                         "topic": "sound"})
    return rows


def write_jsonl(path, rows) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "byo")
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "ckpt", "mixtral")
    write_jsonl(out / "reviews.jsonl", classification_rows())
    write_jsonl(out / "qa.jsonl", generative_rows())
    print(f"wrote {out}/ckpt (tiny Mixtral + tokenizer), {out}/reviews.jsonl, {out}/qa.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
