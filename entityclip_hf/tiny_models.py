"""Small EntityCLIP building blocks made from scratch, offline: for tests, smoke runs, the demo and benchmarks.

Nothing here downloads anything. The tokenizer is a real byte-level BPE trained with the `tokenizers` library
in the way CLIP's own tokenizer works (lower-case, CLIP's pre-tokenizer, `</w>` end-of-word suffix, every byte in
the vocabulary so that no text is ever out of vocabulary), so code tested against it behaves as with the real one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Tokenizer, models, trainers
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from .processing_entityclip import EntityCLIPProcessor

__all__ = [
    "DEFAULT_CORPUS",
    "train_bpe_tokenizer",
    "tiny_clip_config",
    "tiny_image_processor",
    "tiny_processor",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

# Entity-centric news captions and explanations in the style of N24News / GoodNews / VisualNews: names, places,
# organisations, dates and numbers, so that the trained merges look like those of a news tokenizer.
DEFAULT_CORPUS = (
    "Chancellor Angela Merkel speaks to reporters in Berlin after talks with President Emmanuel Macron.",
    "President Barack Obama waves from the steps of Air Force One at Andrews Air Force Base on Tuesday.",
    "Serena Williams celebrates her victory over Maria Sharapova at the Australian Open in Melbourne.",
    "Firefighters battle a wildfire near Santa Rosa, California, on Oct. 9, 2017.",
    "Prime Minister Theresa May leaves 10 Downing Street for the House of Commons in London.",
    "Lionel Messi scores for Barcelona against Real Madrid at the Camp Nou stadium.",
    "The New York Yankees beat the Boston Red Sox 5-3 at Fenway Park on Sunday night.",
    "Secretary of State Hillary Clinton arrives at the United Nations headquarters in New York.",
    "Protesters gather in Tahrir Square in Cairo, Egypt, demanding the resignation of Hosni Mubarak.",
    "Apple chief executive Tim Cook introduces the new iPhone in Cupertino, California.",
    "Pope Francis greets the crowd in St. Peter's Square at the Vatican on Easter Sunday.",
    "Vladimir Putin and Xi Jinping shake hands at the Kremlin in Moscow during a state visit.",
    "Rescue workers search the rubble after an earthquake struck central Italy near Amatrice.",
    "LeBron James of the Cleveland Cavaliers dunks against the Golden State Warriors in Oakland.",
    "Senator Bernie Sanders addresses supporters at a rally in Des Moines, Iowa, before the caucuses.",
    "Refugees arrive on the Greek island of Lesbos after crossing the Aegean Sea from Turkey.",
    "The Supreme Court building in Washington, D.C., where the justices heard arguments on Monday.",
    "Elon Musk watches the SpaceX Falcon 9 rocket lift off from Cape Canaveral, Florida.",
    "Queen Elizabeth II attends the State Opening of Parliament at the Palace of Westminster.",
    "Usain Bolt of Jamaica wins the 100 meters final at the Olympic Stadium in Rio de Janeiro.",
    "Flood waters cover streets in Houston, Texas, after Hurricane Harvey made landfall.",
    "German Chancellor Olaf Scholz meets Ukrainian President Volodymyr Zelensky in Kyiv.",
    "Shinzo Abe, Japan's prime minister, speaks at a news conference in Tokyo.",
    "Roger Federer returns a shot to Rafael Nadal during the Wimbledon final at the All England Club.",
    "Demonstrators march down Fifth Avenue in Manhattan during the Women's March in January.",
    "Nelson Mandela's former home in Soweto, Johannesburg, has become a museum.",
    "Workers assemble cars at the Toyota factory in Georgetown, Kentucky.",
    "The Eiffel Tower is lit in the colors of the French flag after the attacks in Paris.",
    "Justin Trudeau, Canada's prime minister, marches in the Pride parade in Toronto.",
    "Malala Yousafzai receives the Nobel Peace Prize in Oslo, Norway, in December 2014.",
    "Angela Merkel is the chancellor of Germany and leader of the Christian Democratic Union.",
    "Barack Obama was the 44th president of the United States, from 2009 to 2017.",
    "Fenway Park is a baseball stadium in Boston and the home of the Red Sox since 1912.",
    "The Kremlin is the fortified complex in Moscow that serves as the residence of Russia's president.",
    "Wimbledon is the oldest tennis tournament in the world, played on grass in London since 1877.",
    "Tahrir Square in central Cairo was the center of the 2011 Egyptian revolution.",
    "SpaceX is an American aerospace company founded by Elon Musk in 2002 in Hawthorne, California.",
    "The United Nations is an intergovernmental organization headquartered in New York City.",
    "Hurricane Harvey was a Category 4 storm that hit Texas and Louisiana in August 2017.",
    "Lesbos is a Greek island in the northeastern Aegean Sea, close to the coast of Turkey.",
)


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE, in byte order (the order of CLIP's vocabulary)."""
    return list(bytes_to_unicode().values())


def train_bpe_tokenizer(
    texts: Iterable[str] | None = None,
    vocab_size: int = 1000,
    min_frequency: int = 2,
    model_max_length: int = 77,
) -> CLIPTokenizer:
    """Train a small byte-level BPE on `texts` and wrap it as a transformers `CLIPTokenizer`.

    The vocabulary is laid out like CLIP's: the 256 byte symbols, the same with `</w>`, the merges in training order,
    then `<|startoftext|>` and `<|endoftext|>` (also the padding and unknown token). Every byte being present means
    any text, in any script, tokenizes without an unknown token.

    Args:
        texts: Training corpus; defaults to `DEFAULT_CORPUS` (entity-centric news sentences).
        vocab_size: Upper bound of the vocabulary size, special tokens included; at least 515.
        min_frequency: A pair is merged only if it occurs at least this often.
        model_max_length: Sequence length that `truncation=True` cuts to (77 like CLIP).
    """
    alphabet = _byte_alphabet()
    base_size = 2 * len(alphabet) + 2
    if vocab_size <= base_size:
        raise ValueError(f"vocab_size must exceed {base_size} (every byte with and without '</w>' plus 2 specials)")
    texts = list(DEFAULT_CORPUS if texts is None else texts)
    bad = [i for i, text in enumerate(texts) if not isinstance(text, str)]
    if bad:
        raise ValueError(f"texts must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")

    # Train with exactly the normaliser and pre-tokeniser that CLIPTokenizer will apply at encoding time,
    # so the learnt merges fit the pieces they will meet.
    clip_pipeline = CLIPTokenizer().backend_tokenizer
    trainer_model = Tokenizer(models.BPE(unk_token=EOS_TOKEN, end_of_word_suffix=END_OF_WORD))
    trainer_model.normalizer = clip_pipeline.normalizer
    trainer_model.pre_tokenizer = clip_pipeline.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        # Registering every "byte</w>" symbol up front fixes its id; otherwise ids follow the iteration order of a
        # randomly seeded hash map and ties between equally frequent pairs are broken differently on every run.
        special_tokens=[symbol + END_OF_WORD for symbol in alphabet],
        initial_alphabet=alphabet,
        end_of_word_suffix=END_OF_WORD,
        show_progress=False,
    )
    trainer_model.train_from_iterator(texts, trainer)
    merges = [tuple(pair) for pair in json.loads(trainer_model.to_str())["model"]["merges"]]
    # A prefix of a BPE merge list is itself a consistent BPE, so the budget is met by keeping the earliest merges.
    merges = merges[: vocab_size - base_size]

    vocab: dict[str, int] = {}
    for token in alphabet + [symbol + END_OF_WORD for symbol in alphabet] + ["".join(pair) for pair in merges]:
        vocab.setdefault(token, len(vocab))
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def tiny_clip_config(
    tokenizer: CLIPTokenizer,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int | None = None,
    image_size: int = 32,
    patch_size: int = 8,
    projection_dim: int = 32,
    attn_implementation: str = "sdpa",
) -> CLIPConfig:
    """A CLIP configuration small enough to build and run in milliseconds, matched to `tokenizer`.

    The text side takes its vocabulary size, sequence length and bos/eos/pad ids from the tokenizer: CLIP pools
    the text at `input_ids == eos_token_id`, so the default ids of OpenAI's vocabulary would break pooling.
    """
    intermediate_size = 4 * hidden_size if intermediate_size is None else intermediate_size
    shared = {
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_attention_heads,
        "projection_dim": projection_dim,
    }
    text_config = {
        **shared,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": tokenizer.model_max_length,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {**shared, "image_size": image_size, "patch_size": patch_size}
    return CLIPConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=projection_dim,
        attn_implementation=attn_implementation,
    )


def tiny_image_processor(image_size: int = 32) -> CLIPImageProcessorPil:
    """CLIP's image preprocessing (resize shortest edge, centre crop, OpenAI mean/std) at `image_size` pixels."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def tiny_processor(texts: Iterable[str] | None = None, image_size: int = 32, vocab_size: int = 1000):
    """An `EntityCLIPProcessor` with a BPE trained on `texts` (default: `DEFAULT_CORPUS`) and `image_size` images."""
    return EntityCLIPProcessor(
        image_processor=tiny_image_processor(image_size),
        tokenizer=train_bpe_tokenizer(texts, vocab_size=vocab_size),
    )
