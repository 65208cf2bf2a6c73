"""The pretrained-model tokenizers give the published token ids.

The references under tests/fixtures/tokenizers/ come from open_clip and transformers themselves
(tests/fixtures/make_tokenizer_fixtures.py); these tests need neither, except the one that reruns
that script.
"""

import gzip
import importlib.util
import json
import pathlib
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

from clipjax.data import tokenizers
from clipjax.data.clip_bpe import ClipBpeTokenizer
from clipjax.schema import ConfigError

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "tokenizers"
SCRIPT = ROOT / "tests" / "fixtures" / "make_tokenizer_fixtures.py"

# kind: (config less the file, the file's config key, the file, the reference ids)
KINDS = {
    "clip_bpe": (
        dict(kind="clip_bpe", max_len=77),
        "vocab_file",
        "clip_bpe_small.txt.gz",
        "clip_bpe_ids.json",
    ),
    "hf": (
        dict(kind="hf", max_len=77, pad_token="<|endoftext|>"),
        "tokenizer_file",
        "hf_clip_tokenizer.json",
        "hf_clip_ids.json",
    ),
    "siglip": (
        dict(kind="sentencepiece", style="siglip", max_len=64),
        "model_file",
        "siglip_spiece.model",
        "siglip_ids.json",
    ),
    "siglip_pad": (
        dict(kind="sentencepiece", style="siglip", max_len=64, pad_token="<pad>"),
        "model_file",
        "siglip_spiece.model",
        "siglip_pad_ids.json",
    ),
    "siglip2": (
        dict(kind="hf", style="siglip2", max_len=64),
        "tokenizer_file",
        "siglip2_tokenizer.json",
        "siglip2_ids.json",
    ),
    "siglip2_spm": (
        dict(kind="sentencepiece", style="siglip2", max_len=64),
        "model_file",
        "siglip2_tokenizer.model",
        "siglip2_spm_ids.json",
    ),
}


@pytest.fixture(scope="module")
def captions():
    return json.loads((FIXTURES / "captions.json").read_text())


def _reference(name):
    """The stored rows padded back to [N, max_len], and the stored facts."""
    ref = json.loads((FIXTURES / name).read_text())
    ids = np.full((len(ref["rows"]), ref["max_len"]), ref["pad_id"], dtype=np.int32)
    for i, row in enumerate(ref["rows"]):
        ids[i, : len(row)] = row
    return ids, ref


def _config(kind, folder=FIXTURES):
    config, key, file, _ = KINDS[kind]
    return dict(config, **{key: str(folder / file)})


def _assert_same_ids(ours, theirs, captions):
    assert ours.dtype == np.int32 and ours.shape == theirs.shape
    bad = np.nonzero((ours != theirs).any(axis=1))[0]
    assert not len(bad), (
        f"{len(bad)} captions differ, first {captions[bad[0]]!r}: {ours[bad[0]]} != {theirs[bad[0]]}"
    )


@pytest.mark.parametrize("kind", list(KINDS))
def test_ids_equal_the_reference_tokenizers(kind, captions):
    tok = tokenizers.make_tokenizer(_config(kind))
    theirs, ref = _reference(KINDS[kind][3])
    assert len(captions) >= 500
    _assert_same_ids(tok.encode(captions), theirs, captions)
    for name in ("max_len", "pad_id", "vocab_size", "bos_id", "eos_id"):
        assert getattr(tok, name) == ref[name], name
    # Some captions truncate: their last place holds the end of text.
    long = [i for i, c in enumerate(captions) if len(c.split()) > 100]
    assert long and (theirs[long, -1] == ref["eos_id"]).all()
    # Bytes are read as UTF-8; grain's worker processes get a pickled copy.
    np.testing.assert_array_equal(tok.encode([c.encode("utf-8") for c in captions[:50]]), theirs[:50])
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(tok)).encode(captions), theirs)


def test_clip_bpe_conventions(tmp_path):
    tok = ClipBpeTokenizer(str(FIXTURES / "clip_bpe_small.txt.gz"), max_len=77)
    # The small file: 2000 merges, so the specials follow 512 byte tokens and the merges.
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (2514, 2512, 2513, 0)
    ids = tok.encode(["A Photo of a CAT!", "", "wow!?"])
    assert ids[0, :8].tolist() == [tok.bos_id, 320, 1125, 539, 320, 2368, 256, tok.eos_id]
    assert ids[1, :3].tolist() == [tok.bos_id, tok.eos_id, 0]
    assert ids[2, :6].tolist() == [tok.bos_id, 1613, 342, 0, 286, tok.eos_id]  # "!" is id 0, inside the text
    assert tok.decode(ids[0]) == "a photo of a cat !"
    short = ClipBpeTokenizer(str(FIXTURES / "clip_bpe_small.txt.gz"), max_len=4).encode(
        ["one two three four"]
    )
    assert short[0, 0] == tok.bos_id and short[0, -1] == tok.eos_id
    # A plain-text merges file reads the same.
    plain = tmp_path / "merges.txt"
    plain.write_bytes(gzip.decompress((FIXTURES / "clip_bpe_small.txt.gz").read_bytes()))
    np.testing.assert_array_equal(ClipBpeTokenizer(str(plain)).encode(["A Photo of a CAT!"]), ids[:1])
    with pytest.raises(FileNotFoundError, match="nope.txt.gz"):
        ClipBpeTokenizer("nope.txt.gz")


def test_siglip_conventions():
    model = str(FIXTURES / "siglip_spiece.model")
    tok = tokenizers.SiglipSentencePieceTokenizer(model, max_len=16)
    assert tok.bos_id is None and tok.pad_id == tok.eos_id == 1 and tok.unk_id == 2
    ids = tok.encode(["A photo, of a DOG!!", "a photo of a dog", "", "a " * 20])
    np.testing.assert_array_equal(ids[0], ids[1])  # lower case, no punctuation
    assert list(ids[2]) == [tok.eos_id] * 16
    assert ids[3, -1] == tok.eos_id and (ids[3, :-1] != tok.eos_id).all()
    assert tok.decode(ids[1]) == "a photo of a dog"
    own_pad = tokenizers.SiglipSentencePieceTokenizer(model, max_len=16, pad_token="<pad>")
    row, default_row = own_pad.encode(["a dog"])[0].tolist(), tok.encode(["a dog"])[0].tolist()
    end = row.index(tok.eos_id)
    assert own_pad.pad_id == 0 and row[:end] == default_row[:end] and set(row[end + 1 :]) == {0}
    # The default style is unchanged: the model's bos/eos around the text, padding 0.
    plain = tokenizers.make_tokenizer(dict(kind="sentencepiece", max_len=8, model_file=model))
    assert type(plain) is tokenizers.SentencePieceTokenizer and plain.pad_id == 0


def test_siglip2_conventions(tmp_path):
    """SigLIP 2's Gemma tokenizer: lower case (punctuation kept, unlike SigLIP's), no start token,
    <eos> last even when cut, <pad> on the right; whatever a Gemma tokenizer.json's own
    post-processor and padding say (a Gemma LM's file starts with <bos> and pads on the left)."""
    tok = tokenizers.make_tokenizer(_config("siglip2"))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.max_len) == (None, 1, 0, 64)
    ids = tok.encode(["A Photo of a DOG", "a photo of a dog", "a photo of a dog.", "dog " * 80])
    np.testing.assert_array_equal(ids[0], ids[1])
    assert (ids[1] != ids[2]).any()
    end = ids[1].tolist().index(1)
    assert ids[1, end + 1 :].tolist() == [0] * (63 - end) and ids[3, -1] == 1 and 0 not in ids[3]
    assert tok.decode(ids[0]) == "a photo of a dog"
    spec = json.loads((FIXTURES / "siglip2_tokenizer.json").read_text())
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]}},
    }
    spec["padding"] = {
        "strategy": "BatchLongest", "direction": "Left", "pad_to_multiple_of": None, "pad_id": 0,
        "pad_type_id": 0, "pad_token": "<pad>",
    }  # fmt: skip
    (tmp_path / "lm.json").write_text(json.dumps(spec))
    lm = tokenizers.make_tokenizer(dict(_config("siglip2"), tokenizer_file=str(tmp_path / "lm.json")))
    np.testing.assert_array_equal(lm.encode(["A Photo of a DOG"]), ids[:1])
    plain = tokenizers.make_tokenizer(
        dict(_config("siglip2"), style="clipjax", pad_token="<pad>")
    )  # as filed
    assert plain.encode(["a"])[0, -1] == 0 and 1 in plain.encode(["a"])[0]  # its own <eos>, no lower case
    assert (plain.encode(["A Photo"]) != tok.encode(["A Photo"])).any()
    with pytest.raises(ValueError, match="no '<eos>' token, which SigLIP 2's tokenizer needs"):
        tokenizers.make_tokenizer(dict(_config("hf"), style="siglip2"))
    with pytest.raises(ValueError, match="no '<eos>' piece, which SigLIP 2's tokenizer needs"):
        tokenizers.make_tokenizer(dict(_config("siglip"), style="siglip2", max_len=8))


def test_hf_padding_token_comes_from_the_file_or_the_config(tmp_path):
    spec = json.loads((FIXTURES / "hf_clip_tokenizer.json").read_text())
    assert spec["padding"] is None
    bare = tmp_path / "tokenizer.json"
    bare.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="data.tokenizer.pad_token"):
        tokenizers.make_tokenizer(dict(kind="hf", tokenizer_file=str(bare)))
    with pytest.raises(ValueError, match="'<nope>'"):
        tokenizers.HfTokenizer(str(bare), 77, pad_token="<nope>")
    spec["padding"] = {
        "strategy": "BatchLongest",
        "direction": "Right",
        "pad_to_multiple_of": None,
        "pad_id": 0,
        "pad_type_id": 0,
        "pad_token": "!",
    }
    padded = tmp_path / "padded.json"
    padded.write_text(json.dumps(spec))
    tok = tokenizers.make_tokenizer(dict(kind="hf", max_len=6, tokenizer_file=str(padded)))
    assert tok.pad_id == 0 and tok.encode(["cat"]).tolist() == [[tok.bos_id, 2368, tok.eos_id, 0, 0, 0]]
    assert "cat" in tok.decode(tok.encode(["a cat"])[0])
    # The configured token wins over the file's.
    assert tokenizers.HfTokenizer(str(padded), 6, pad_token="<|endoftext|>").pad_id == tok.eos_id


@pytest.mark.parametrize("kind", list(KINDS))
def test_checkpoint_form_rebuilds_without_the_files(kind, tmp_path, captions):
    file = KINDS[kind][2]
    shutil.copy(FIXTURES / file, tmp_path / file)
    tok = tokenizers.make_tokenizer(_config(kind, tmp_path))
    saved = json.loads(json.dumps(tokenizers.tokenizer_to_json(tok)))  # as a checkpoint stores it
    (tmp_path / file).unlink()
    again = tokenizers.tokenizer_from_json(saved)
    assert type(again) is type(tok) and saved["kind"] == KINDS[kind][0]["kind"]
    theirs, _ = _reference(KINDS[kind][3])
    _assert_same_ids(again.encode(captions), theirs, captions)
    for name in ("max_len", "pad_id", "vocab_size", "bos_id", "eos_id"):
        assert getattr(again, name) == getattr(tok, name), name


def test_earlier_stored_forms_still_load(tmp_path):
    texts = ["a red cat", "a blue dog", "two red dogs"] * 5
    model = tokenizers.train_sentencepiece(texts, str(tmp_path / "m"), 50)
    tok = tokenizers.SentencePieceTokenizer(model, 6)
    first_release = {
        "kind": "sentencepiece",
        "max_len": 6,
        "model_proto": tokenizers.tokenizer_to_json(tok)["model_proto"],
    }
    assert tokenizers.tokenizer_to_json(tok) == first_release  # the default style stores what it did
    again = tokenizers.tokenizer_from_json(first_release)
    assert type(again) is tokenizers.SentencePieceTokenizer
    np.testing.assert_array_equal(again.encode(texts), tok.encode(texts))
    assert isinstance(
        tokenizers.tokenizer_from_json({"kind": "byte", "max_len": 5}), tokenizers.ByteTokenizer
    )


def _one_line_error(error_type, config, *needles):
    with pytest.raises(error_type) as info:
        tokenizers.make_tokenizer(config)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_config_errors_are_one_line_and_name_the_key(tmp_path):
    missing = str(tmp_path / "gone" / "file")
    _one_line_error(ConfigError, dict(kind="clip_bpe"), "data.tokenizer.vocab_file")
    _one_line_error(
        FileNotFoundError, dict(kind="clip_bpe", vocab_file=missing), "data.tokenizer.vocab_file", missing
    )
    _one_line_error(ConfigError, dict(kind="hf", pad_token="x"), "data.tokenizer.tokenizer_file")
    _one_line_error(
        FileNotFoundError, dict(kind="hf", tokenizer_file=missing), "data.tokenizer.tokenizer_file", missing
    )
    _one_line_error(ConfigError, dict(kind="sentencepiece", style="siglip"), "data.tokenizer.model_file")
    _one_line_error(
        FileNotFoundError,
        dict(kind="sentencepiece", style="siglip", model_file=missing),
        "data.tokenizer.model_file",
    )
    _one_line_error(ConfigError, dict(kind="sentencepiece", style="openai"), "data.tokenizer.style")
    _one_line_error(ConfigError, dict(kind="bpe"), "data.tokenizer.kind", "clip_bpe")
    _one_line_error(
        ConfigError, dict(kind="hf", tokenizer_fle="x"), "data.tokenizer.tokenizer_fle", "tokenizer_file"
    )


def _missing_reference_packages():
    return [
        m for m in ("torch", "open_clip", "transformers", "tokenizers") if importlib.util.find_spec(m) is None
    ]


@pytest.mark.skipif(bool(_missing_reference_packages()), reason="needs torch, open_clip and transformers")
def test_fixture_script_reproduces_the_fixtures(tmp_path):
    """Reruns the script (which also checks the full CLIP vocabulary against open_clip)."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "575/575 captions give open_clip's ids" in result.stdout
    stored = sorted(p.name for p in FIXTURES.iterdir())
    assert sorted(p.name for p in out.iterdir()) == stored
    for name in stored:
        ours, theirs = (out / name).read_bytes(), (FIXTURES / name).read_bytes()
        if name.endswith(".gz"):
            ours, theirs = gzip.decompress(ours), gzip.decompress(theirs)
        elif name.endswith(".json"):
            ours, theirs = json.loads(ours), json.loads(theirs)
        assert ours == theirs, f"{name} differs from the stored fixture"
