"""Caption recovery on trained fine-tunes (finextract_jax/testbed/caption_table.py): the caption
rule, and one whole case on a tiny base (fine-tune, search, three extractions), resumed."""
import dataclasses
import json
import os

import numpy as np
import pytest

from finextract_jax import caption as caption_lib
from finextract_jax.errors import InputError
from finextract_jax.testbed import caption_table

TRAIN_CAPTIONS = ["noto red apple", "twemoji red apple", "noto grinning face with big eyes", "twemoji keycap 0",
                  "noto old castle", "twemoji face with tears of joy"]
VOCABULARY = {"noto", "twemoji", "red", "apple", "grinning", "face", "with", "big", "eyes", "keycap", "old", "castle",
              "tears", "of", "joy"}


def test_captions_are_windows_of_training_captions_in_the_vocabulary():
    windows = caption_table.caption_windows(TRAIN_CAPTIONS, VOCABULARY - {"joy"}, 3)
    assert "red apple" not in windows and "noto red apple" in windows and "grinning face with" in windows
    assert "twemoji keycap 0" not in windows  # '0' is no candidate word: the search could never find it
    assert "tears of joy" not in windows and "with tears of" in windows  # 'joy' left out of the vocabulary
    assert windows == sorted(set(windows))
    cases = caption_table.pick_cases(TRAIN_CAPTIONS, VOCABULARY, (1, 3, 5), 2, seed=4)
    assert [(c.length, c.index) for c in cases] == [(1, 0), (3, 0), (5, 0), (1, 1), (3, 1), (5, 1)]  # spans lengths first
    assert cases == caption_table.pick_cases(TRAIN_CAPTIONS, VOCABULARY, (1, 3, 5), 2, seed=4)  # deterministic
    for c in cases:
        assert len(c.caption.split()) == c.length and set(c.caption.split()) <= VOCABULARY
        assert any(c.caption in t for t in TRAIN_CAPTIONS)
    assert len({c.caption for c in cases}) == len(cases)
    assert {c.name for c in cases} == {"len1_0", "len1_1", "len3_0", "len3_1", "len5_0", "len5_1"}
    other_seeds = {caption_table.pick_cases(TRAIN_CAPTIONS, VOCABULARY, (1,), 2, seed=s)[0].caption for s in range(8)}
    assert len(other_seeds) > 1
    assert len(caption_table.pick_cases(TRAIN_CAPTIONS, VOCABULARY, (6,), 2, seed=0)) == 2
    with pytest.raises(InputError, match="2 distinct 6-word"):
        caption_table.pick_cases(TRAIN_CAPTIONS, VOCABULARY, (6,), 3, seed=0)
    for bad in (["0"], ["a"], []):
        with pytest.raises(InputError, match="--lengths"):
            caption_table.parse_lengths(bad)
    assert caption_table.parse_lengths(["3", "1", "3"]) == (3, 1)
    assert caption_lib.word_recall("face red red", "red face with") == pytest.approx(2 / 3)
    assert caption_lib.word_recall("", "red face") == 0.0


def _splits(resolution):
    """A testbed-shaped split: train captions of the tiny tokenizer's words; two Twemoji private images."""
    rng = np.random.default_rng(0)
    image = lambda: rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)
    train = ["a photo of dog", "red old castle", "art by the sea"]
    return {"train": (np.stack([image() for _ in train]), train, [f"noto_{i}" for i in range(3)]),
            "private": (np.stack([image() for _ in range(3)]), ["noto cat", "twemoji cat", "twemoji cat face"],
                        ["noto_1f638", "twemoji_1f638", "twemoji_1f639"])}


def _prompt_of(folder):
    with open(os.path.join(folder, "object", "dreambooth", "finextract", "run.json")) as f:
        return json.load(f)["settings"]["prompt"]


def _files(folder):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(folder) for f in fs}


def test_table_searches_extracts_with_each_prompt_and_resumes(tiny_dir, tiny_pipe, tmp_path, monkeypatch):
    """One 2-word caption: its private set, the search (min_gain -1 accepts the best single word, so the
    recovered caption is a third prompt), an extraction with each prompt, the table; a rerun redoes
    nothing. The fine-tune is stood in for by the base itself (a DreamBooth model of zero steps) with
    the done record reproduce writes for it, as in test_testbed's sweep test: fine-tuning is reproduce's."""
    import shutil

    from finextract_jax import reproduce
    from finextract_jax.testbed.curve import Point

    work = str(tmp_path / "work")
    search = caption_lib.CaptionConfig(max_words=1, refine_sweeps=0, min_gain=-1.0, timesteps=(500,), words=(),
                                       batch_size=64)
    job = caption_table.Job(tiny_dir["pixel"], work, Point("dreambooth", 2, 1e-4), seed=1, search=search,
                            run=dict(num_images=2, steps=2, features="pixel"), search_images="train")
    splits = _splits(16)
    (case,) = caption_table.pick_cases(splits["train"][1], caption_table.vocabulary(tiny_pipe("pixel").tokenizer),
                                       (2,), 1, job.seed)
    true = case.caption
    dataset = caption_table.case_dataset(job, case, splits)
    stage = reproduce.plan(caption_table.run_settings(job, case, dataset, "true"))[0]
    assert stage.name == "finetune" and stage.settings["datasets"].endswith(":" + true)  # fine-tuned under it
    model = os.path.join(stage.folder, "model")
    shutil.copytree(tiny_dir["pixel"], model)
    reproduce.mark_done(stage.folder, "finetune", stage.settings, 1.0)

    rows = caption_table.caption_table(job, splits, lengths=(2,), per_length=1)
    (row,) = rows
    assert row["caption"] == true and len(true.split()) == 2 and any(true in c for c in splits["train"][1])
    recovered = row["recovered"]
    assert len(recovered.split()) == 1 and recovered != true
    assert row["recall"] == caption_lib.word_recall(recovered, true) and row["exact"] == 0.0
    with open(os.path.join(dataset.train_dir, "metadata.csv")) as f:  # the private Twemoji images, captioned so
        assert f.read().splitlines()[1:] == [f"twemoji_1f638.png,{true}", f"twemoji_1f639.png,{true}"]
    case_dir = os.path.join(work, "len2_0")
    assert (_prompt_of(os.path.join(case_dir, "true")), _prompt_of(os.path.join(case_dir, "recovered")),
            _prompt_of(os.path.join(case_dir, "empty"))) == (true, recovered, "")
    for role in ("true", "recovered", "empty"):  # every prompt extracted the one fine-tune
        with open(os.path.join(case_dir, role, "object", "dreambooth", "finextract", "run.json")) as f:
            assert json.load(f)["settings"]["finetuned"] == model
    for role in ("recovered", "empty"):  # with no fine-tune of their own
        assert os.listdir(os.path.join(case_dir, role, "object", "dreambooth")) == ["finextract"]
    with open(os.path.join(case_dir, "caption.json")) as f:
        record = json.load(f)
    assert record["caption"] == recovered and record["true"] == true and record["images"] == "train"
    assert row["search_s"] == record["seconds"] > 0
    with open(os.path.join(case_dir, "recovered", "object", "dreambooth", "finextract", "metrics.json")) as f:
        assert row["AS_recovered"] == json.load(f)["AS"]
    with open(os.path.join(work, caption_table.TABLE_FILE)) as f:
        table = f.read()
    assert f"| 2 | 0 | '{true}' | '{recovered}' |" in table and "| 2 | 1 | " in table  # a case row, a length row

    before = _files(work)
    monkeypatch.setattr(caption_lib, "recover_caption", lambda *a, **k: pytest.fail("searched again"))
    monkeypatch.setattr(reproduce, "run_stage", lambda *a, **k: pytest.fail("a stage ran again"))
    assert caption_table.caption_table(job, splits, lengths=(2,), per_length=1) == rows
    assert {k: v for k, v in _files(work).items() if v != before.get(k)} == {}  # not even the table rewritten...
    changed = dataclasses.replace(job, search=dataclasses.replace(search, max_words=2))
    with pytest.raises(InputError, match="max_words"):  # ... and a search with other settings refused
        caption_table.caption_table(changed, splits, lengths=(2,), per_length=1)


def test_binary_bad_input_is_one_line_exit_2(tmp_path):
    import subprocess
    import sys

    work = tmp_path / "work"
    result = subprocess.run([sys.executable, "-m", "experiments.testbed_caption", f"--pretrained={tmp_path}",
                             f"--workdir={work}", "--lengths=3,0"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--lengths" in result.stderr
    assert not work.exists()
