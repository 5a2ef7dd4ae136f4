"""Tiny random models for tests and CI: a Llama causal LM, a BERT sentence embedder and a T5 seq2seq model,
all sharing a tokenizer trained in-process (nothing is downloaded).

Each builder saves a normal Hugging Face folder, so tests exercise the same loading path as real models.
"""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_CORPUS = [
    "The capital of France is Paris. Paris is a city on the Seine.",
    "The capital of Italy is Rome. Rome was founded on seven hills.",
    "Apple is headquartered in Cupertino, California.",
    "Microsoft is headquartered in Redmond, Washington.",
    "The Eiffel Tower was completed in 1889 and is made of iron.",
    "Mount Everest is the highest mountain above sea level.",
    "Water boils at 100 degrees Celsius at sea level.",
    "Albert Einstein developed the theory of relativity.",
    "The Pacific Ocean is the largest ocean on Earth.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "What is the capital of France? Who founded Rome? Tell me about the ocean.",
    "You are a helpful assistant. Answer the question using the passages. Question: Answer:",
]

_SPECIAL_CHAT = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
_SPECIAL_BERT = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"]


def train_tokenizer(kind: str = "bpe", vocab_size: int = 512, corpus: list[str] | None = None):
    """Train a small tokenizer in-process. `bpe` gives a chat tokenizer (ChatML), `wordpiece` a BERT one."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = (corpus or TINY_CORPUS) * 4
    if kind == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=_SPECIAL_CHAT,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tokenizer.train_from_iterator(texts, trainer)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tokenizer,
            unk_token="<unk>",
            pad_token="<|im_end|>",
            eos_token="<|im_end|>",
            bos_token="<|im_start|>",
            additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        )
        fast.chat_template = CHATML_TEMPLATE
        return fast
    if kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=_SPECIAL_BERT)
        tokenizer.train_from_iterator(texts, trainer)
        cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
            sep_token="[SEP]", mask_token="[MASK]",
        )
    raise ValueError(f"unknown tokenizer kind {kind!r}; use 'bpe' or 'wordpiece'")


def build_tiny_llama(folder: str | Path, seed: int = 0, hidden_size: int = 64, num_layers: int = 2) -> Path:
    """Save a random Llama causal LM with a ChatML tokenizer to `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tokenizer = train_tokenizer("bpe")
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=eos_id, pad_token_id=eos_id, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_bert_embedder(folder: str | Path, seed: int = 0, hidden_size: int = 32) -> Path:
    """Save a random BERT encoder with mean pooling as a sentence-transformers folder."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    folder = Path(folder)
    tokenizer = train_tokenizer("wordpiece")
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    encoder_folder = folder / "encoder"
    BertModel(config).save_pretrained(encoder_folder)
    tokenizer.save_pretrained(encoder_folder)
    transformer = models.Transformer(str(encoder_folder), max_seq_length=128)
    pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(folder))
    return folder


def build_tiny_t5(folder: str | Path, seed: int = 0, d_model: int = 32) -> Path:
    """Save a random T5 seq2seq model with an in-process tokenizer to `folder`."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    folder = Path(folder)
    tokenizer = train_tokenizer("bpe")
    pad_id = tokenizer.convert_tokens_to_ids("<pad>")
    tokenizer.pad_token = "<pad>"
    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_ff=d_model * 2, d_kv=8, num_layers=2,
        num_decoder_layers=2, num_heads=4, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=pad_id,
    )
    torch.manual_seed(seed)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
