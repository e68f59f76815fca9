"""A character-level tokenizer built offline with `tokenizers`, saved as a transformers PreTrainedTokenizerFast.

One token per character of a fixed alphabet plus <pad>, <bos>, <eos>, <unk>. Prompts are chat-free:
`<bos>` + text; the model's answer ends with `<eos>`. Ids are stable: specials first, then the alphabet
in the order given, so two tokenizers built from the same alphabet are identical.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
ARITH_ALPHABET = "0123456789+-*()="


def build_char_tokenizer(alphabet: str = ARITH_ALPHABET):
    """Return a PreTrainedTokenizerFast with one id per character of `alphabet` (after the specials)."""
    from transformers import PreTrainedTokenizerFast

    if len(set(alphabet)) != len(alphabet):
        raise ValueError(f"alphabet has repeated characters: {alphabet!r}")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")  # every char is a word
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


def encode_prompt(tokenizer, text: str) -> list:
    """Token ids of a chat-free prompt: <bos> + characters."""
    return [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)
