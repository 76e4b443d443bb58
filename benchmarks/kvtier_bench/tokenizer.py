"""The locally built tokenizer shared by the random-weight models and the trained one.

A byte-level BPE tokenizer trained with ``tokenizers`` on a synthetic English corpus generated here, the chat
template and the special tokens, and where built models are cached. kvtier_bench.models and kvtier_bench.train
both build on this module, so neither imports the other's internals.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer

VOCAB_SIZE = 4096

# Bump when anything that changes the built files changes (spec, corpus, template).
# v2: initializer_range 0.1 (v1 used 0.02 and only ever existed in local caches).
MODEL_VERSION = 2
MARKER_FILE = "kvtier-model.json"
SEED = 1234

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN) + ROLE_TOKENS

# Messages render as "<|role|>\ncontent<|end|>\n"; the generation prompt opens
# an assistant turn. The model is random, so the template only has to parse.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def default_cache_dir() -> Path:
    """``$KVTIER_HOME/models`` if set, else ``~/.cache/kvtier/models``."""
    home = os.environ.get("KVTIER_HOME")
    if home:
        return Path(home) / "models"
    return Path.home() / ".cache" / "kvtier" / "models"


def write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


# --- tokenizer ---------------------------------------------------------------

_WORDS = """
the of and to in is was that for on are with as his they be at one have this from or had by not
word but what some we can out other were all there when up use your how said an each she which do
their time if will way about many then them write would like so these her long make thing see him
two has look more day could go come did number sound no most people my over know water than call
first who may down side been now find any new work part take get place made live where after back
little only round man year came show every good me give our under name very through just form
sentence great think say help low line differ turn cause much mean before move right boy old too
same tell does set three want air well also play small end put home read hand port large spell add
even land here must big high such follow act why ask men change went light kind off need house
picture try us again animal point mother world near build self earth father head stand own page
should country found answer school grow study still learn plant cover food sun four between state
keep eye never last let thought city tree cross farm hard start might story saw far sea draw left
late run while press close night real life few north open seem together next white children begin
got walk example ease paper group always music those both mark often letter until mile river car
feet care second book carry took science eat room friend began idea fish mountain stop once base
hear horse cut sure watch color face wood main enough plain girl usual young ready above ever red
list though feel talk bird soon body dog family direct pose leave song measure door product black
short numeral class wind question happen complete ship area half rock order fire south problem
piece told knew pass since top whole king space heard best hour better true during hundred five
remember step early hold west ground interest reach fast verb sing listen six table travel less
morning ten simple several vowel toward war lay against pattern slow center love person money serve
appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall lead
cry dark machine note wait plan figure star box noun field rest correct able pound done beauty
drive stood contain front teach week final gave green quick develop ocean warm free minute strong
special mind behind clear tail produce fact street inch multiply nothing course stay wheel full
force blue object decide surface deep moon island foot system busy test record boat common gold
possible plane stead dry wonder laugh thousand ago ran check game shape equate miss brought heat
snow tire bring yes distant fill east paint language among grand ball yet wave drop heart present
heavy dance engine position arm wide sail material size vary settle speak weight general ice matter
circle pair include divide syllable felt perhaps pick sudden count square reason length represent
art subject region energy hunt probable bed brother egg ride cell believe fraction forest sit race
window store summer train sleep prove lone leg exercise wall catch mount wish sky board joy winter
sat written wild instrument kept glass grass cow job edge sign visit past soft fun bright gas
weather month million bear finish happy hope flower clothe strange gone jump baby eight village
meet root buy raise solve metal whether push seven paragraph third shall held hair describe cook
floor either result burn hill safe cat century consider type law bit coast copy phrase silent tall
sand soil roll temperature finger industry value fight lie beat excite natural view sense ear else
quite broke case middle kill son lake moment scale loud spring observe child straight consonant
nation dictionary milk speed method organ pay age section dress cloud surprise quiet stone tiny
climb cool design poor lot experiment bottom key iron single stick flat twenty skin smile crease
hole trade melody trip office receive row mouth exact symbol die least trouble shout except wrote
seed tone join suggest clean break lady yard rise bad blow oil blood touch grew cent mix team wire
cost lost brown wear garden equal sent choose fell fit flow fair bank collect save control decimal
gentle woman captain practice separate difficult doctor please protect noon whose locate ring
character insect caught period indicate radio spoke atom human history effect electric expect crop
modern element hit student corner party supply bone rail imagine provide agree thus capital chair
danger fruit rich thick soldier process operate guess necessary sharp wing create neighbor wash bat
rather crowd corn compare poem string bell depend meat rub tube famous dollar stream fear sight
thin triangle planet hurry chief colony clock mine tie enter major fresh search send yellow gun
allow print dead spot desert suit current lift rose continue block chart hat sell success company
subtract event particular deal swim term opposite wife shoe shoulder spread arrange camp invent
cotton born determine quart nine truck noise level chance gather shop stretch throw shine property
column molecule select wrong gray repeat require broad prepare salt nose plural anger claim
continent oxygen sugar death pretty skill women season solution magnet silver thank branch match
suffix especially fig afraid huge sister steel discuss forward similar guide experience score apple
bought led pitch coat mass card band rope slip win dream evening condition feed tool total basic
smell valley nor double seat arrive master track parent shore division sheet substance favor
connect post spend chord fat glad original share station dad bread charge proper bar offer segment
slave duck instant market degree populate chick dear enemy reply drink occur support speech nature
range steam motion path liquid log meant quotient teeth shell neck cache block tier memory disk
token layer request prefix prompt model server client offload
""".split()  # noqa: SIM905 (a word list reads better as text)

_SYLLABLES = (
    "ka", "ri", "to", "ne", "su", "mo", "la", "vi", "pe", "zo", "an", "el", "in", "or", "un", "ex",
    "st", "tr", "pl", "gr", "br", "th", "sh", "ch", "qu", "ly", "ing", "ed", "er", "est", "tion",
    "ment", "ness", "able", "ful", "less", "ize", "ous", "ive", "al", "ic",
)

_PUNCTUATION = (".", ",", "?", "!", ";", ":")


def corpus(seed: int = SEED, sentences: int = 30000) -> Iterator[str]:
    """Yield a deterministic training corpus: sentences, pseudo-words, numbers, code."""
    rng = random.Random(seed)
    for _ in range(sentences):
        count = rng.randint(4, 16)
        words = [rng.choice(_WORDS) for _ in range(count)]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), _pseudo_word(rng))
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
        words[0] = words[0].capitalize()
        yield " ".join(words) + rng.choice(_PUNCTUATION)
    for number in range(1000):
        yield f"{number} {number * 7 % 1000} {number:04d}"
    for index in range(2000):
        name = rng.choice(_WORDS)
        yield f"def {name}_{index}(value):\n    return value + {index}\n"


def _pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))


def save_tokenizer(target: Path, vocab_size: int, max_length: int) -> dict[str, int]:
    """Train and save the tokenizer; return the ids of the special tokens."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    ids = {token: _token_id(tokenizer, token) for token in SPECIAL_TOKENS}
    # Plain prompts start with BOS, like Llama; chat prompts get it from the template
    # (vLLM tokenizes rendered chat prompts without special tokens).
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, ids[BOS_TOKEN])],
    )
    tokenizer.save(str(target / "tokenizer.json"))
    # Written by hand rather than by transformers' save_pretrained, whose format
    # differs between transformers 4.x and 5.x; both versions read this one.
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": list(ROLE_TOKENS),
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    write_json(target / "tokenizer_config.json", tokenizer_config)
    special_tokens_map = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": list(ROLE_TOKENS),
    }
    write_json(target / "special_tokens_map.json", special_tokens_map)
    return ids


def _token_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise RuntimeError(f"tokenizer training lost special token {token!r}")
    return int(token_id)
