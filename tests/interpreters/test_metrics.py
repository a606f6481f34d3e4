"""Each metric on hand-checked examples; METEOR's WordNet setup and its missing-data error."""

import gzip
import math
import os
import re
from pathlib import Path

import pytest
from interpreters import metrics
from interpreters.metrics import MeteorDataError, bert_score_f1, bleu4, ensure_wordnet, meteor, rouge_l

MAN_LEXNAMES = Path("/usr/share/man/man5/lexnames.5WN.gz")


# ---------------------------------------------------------------- BLEU-4 (sacrebleu)
def test_bleu_identical_is_100():
    assert bleu4(["the cat sat on the mat ."], ["the cat sat on the mat ."]) == pytest.approx(100.0)


def test_bleu_brevity_penalty_by_hand():
    # Every n-gram of the 5-token hypothesis is in the 6-token reference (precisions 5/5, 4/4, 3/3, 2/2), so
    # sacrebleu's BLEU is the brevity penalty alone: exp(1 - r/c) with r = 6, c = 5.
    got = bleu4(["the cat sat on the"], ["the cat sat on the mat"])
    assert got == pytest.approx(100 * math.exp(1 - 6 / 5), abs=1e-6)


def test_bleu_length_mismatch_raises():
    with pytest.raises(ValueError, match="one reference each"):
        bleu4(["a"], ["a", "b"])


# ---------------------------------------------------------------- ROUGE-L (rouge-score)
def test_rouge_l_identical_is_100():
    assert rouge_l(["A dog runs."], ["a dog runs"]) == pytest.approx(100.0)  # lowercased, punctuation dropped


def test_rouge_l_lcs_by_hand():
    # LCS("a x b y c z", "a b c") = "a b c" = 3: recall 3/6, precision 3/3, F = 2PR/(P+R) = 2/3.
    assert rouge_l(["a b c"], ["a x b y c z"]) == pytest.approx(100 * 2 / 3)
    # mean over pairs: (2/3 + 3/4) / 2, the second LCS being "a c d" of 4 and 4 tokens
    assert rouge_l(["a b c", "a b c d"], ["a x b y c z", "a c d e"]) == pytest.approx(100 * (2 / 3 + 3 / 4) / 2)


# ---------------------------------------------------------------- METEOR (nltk + WordNet)
@pytest.fixture(scope="module")
def wordnet_dir():
    try:
        return ensure_wordnet()
    except MeteorDataError as exc:
        pytest.skip(f"no WordNet here: {exc}")


def test_meteor_identical_by_hand(wordnet_dir):
    # 3 matched unigrams in one chunk: F_mean = 1, penalty = 0.5 * (chunks / matches)^3 = 0.5 / 27.
    assert meteor(["the dog runs"], ["The dog runs"]) == pytest.approx(100 * (1 - 0.5 / 27))


def test_meteor_wordnet_synonym_counts(wordnet_dir):
    from nltk.corpus import wordnet as wn

    shared = [s for s in wn.synsets("dog") if "hound" in s.lemma_names()]
    assert shared, "'dog' and 'hound' share a synset in WordNet 3.0 (cad.n.01)"
    synonym = meteor(["the hound runs"], ["the dog runs"])
    unrelated = meteor(["the cat runs"], ["the dog runs"])
    assert synonym == pytest.approx(100 * (1 - 0.5 / 27))  # matched through WordNet like an exact word
    assert synonym > unrelated + 30


def test_wordnet_folder_built_for_nltk(wordnet_dir):
    """The folder nltk loads from has the lexnames and index.sense files nltk's reader needs, and they agree."""
    from nltk.corpus import wordnet as wn

    lexnames = (wordnet_dir / "lexnames").read_text().splitlines()
    assert len(lexnames) == 45 and lexnames[5].split("\t")[1] == "noun.animal"
    assert wn.lemma_from_key("dog%1:05:00::").synset().name() == "dog.n.01"
    lemmas = [lemma for word in ("dog", "run", "quick", "happy", "slowly", "bank") for lemma in wn.lemmas(word)]
    assert any(lemma.synset().pos() == "s" for lemma in lemmas)  # satellites: keys name their head adjective
    for lemma in lemmas:
        assert wn.lemma_from_key(lemma.key()) == lemma


@pytest.mark.skipif(not MAN_LEXNAMES.is_file(), reason="WordNet man page lexnames(5WN) not installed")
def test_lexnames_constant_matches_man_page():
    text = gzip.decompress(MAN_LEXNAMES.read_bytes()).decode()
    documented = [tuple(line.split("\t")[:2]) for line in text.splitlines() if re.match(r"^\d\d\t", line)]
    ours = [tuple(line.split("\t")[:2]) for line in metrics.LEXNAMES.splitlines()]
    assert [(n, name.strip()) for n, name in documented] == ours


def test_meteor_missing_wordnet_is_instructive(monkeypatch, tmp_path):
    monkeypatch.setattr(metrics, "_nltk_has_wordnet", lambda: False)
    monkeypatch.setattr(metrics, "DEBIAN_WORDNET_DIR", tmp_path / "no-wordnet")
    monkeypatch.setenv("LATENT_NLTK_DATA", str(tmp_path / "nltk_data"))
    with pytest.raises(MeteorDataError) as info:
        meteor(["a dog"], ["a dog"])
    message = str(info.value)
    assert "apt-get install -y wordnet-base" in message
    assert "nltk.downloader" in message and "NLTK_DATA" in message
    assert not (tmp_path / "nltk_data").exists()


# ---------------------------------------------------------------- BERTScore (bert-score + shipped MiniLM)
@pytest.fixture(scope="module")
def minilm():
    os.environ["HF_HUB_OFFLINE"] = "1"
    return metrics.shipped_minilm_path()


def test_bertscore_identical_and_similar_beats_unrelated(minilm):
    ref = "a dog is running in a park"
    identical = bert_score_f1([ref], [ref], model=minilm, num_layers=6)
    similar = bert_score_f1(["a dog runs in the park"], [ref], model=minilm, num_layers=6)
    unrelated = bert_score_f1(["the stock market fell sharply today"], [ref], model=minilm, num_layers=6)
    assert identical == pytest.approx(100.0, abs=1e-3)
    assert similar > unrelated + 20


def test_bertscore_unknown_model_needs_num_layers(minilm):
    with pytest.raises(ValueError, match="num_layers"):
        bert_score_f1(["a"], ["a"], model=minilm)


def test_missing_wordnet_is_one_error_on_the_command_line(monkeypatch, tmp_path):
    from interpreters.cli import app
    from typer.testing import CliRunner

    monkeypatch.setattr(metrics, "_nltk_has_wordnet", lambda: False)
    monkeypatch.setattr(metrics, "DEBIAN_WORDNET_DIR", tmp_path / "no-wordnet")
    monkeypatch.setenv("LATENT_NLTK_DATA", str(tmp_path / "nltk_data"))
    decoded = tmp_path / "decoded.jsonl"
    decoded.write_text('{"stage": "summary", "target": "a", "prediction": "a", "condition": "real"}\n')
    result = CliRunner().invoke(app, ["score", "--decoded", str(decoded), "--out", str(tmp_path / "s"), "--metrics",
                                      "meteor"])  # fmt: skip
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.startswith("error: ") and "apt-get install -y wordnet-base" in result.output
