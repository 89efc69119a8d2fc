"""Caption recovery on trained fine-tunes of the testbed base, and what it is worth to extraction.

For each caption length L and index i < per_length: a caption of L words (the rule below), the
private object set (Twemoji's nine cat faces, testbed/data.py) fine-tuned under it at one curve
Point (default DreamBooth, 200 steps at lr 5e-4) through `reproduce`, the caption recovered from
the base and the fine-tune (`caption.recover_caption`), then FineXtract from one start noise (the
seed's) with the true, the recovered and the empty prompt, clustered and scored as the curve
scores them (AS, A-ESR). Per length: word recall (caption.word_recall), exact-match rate and
seconds per search.

The caption rule: a window of L consecutive words of one of the base's training captions ('noto
mahjong tile red dragon' gives 'tile red dragon' for L = 3) whose every word is a whole-word
candidate of the base's tokenizer (`caption.candidate_words`: a word the search can propose, so
no digits), drawn uniformly among the distinct such windows, without replacement, by numpy's
generator seeded with (seed, L). A user fine-tuning this base captions in its language: a window
is a run of words the base learned to read, in an order it has seen, and is a whole training
caption only when that caption has L words. The search's candidates are every whole word of the
tokenizer (the base's public vocabulary: its training words and the tokenizer's generic ones),
screened on a few pairs first when `screen_pairs` is set.

Layout of WORKDIR: private/<caption words joined by _>/ (the set captioned so in metadata.csv),
lenL_i/true/ (the reproduce run that fine-tunes and extracts with the true caption),
lenL_i/caption.json (the search), lenL_i/recovered/ and lenL_i/empty/ (reproduce runs on the true
run's fine-tune, `Settings.prompt` set), and caption_table.md, rewritten after each fine-tune.
Every part resumes: reproduce's stage records, and caption.json when its settings match.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np

from finextract_jax import caption as caption_lib
from finextract_jax.errors import InputError
from finextract_jax.testbed.curve import Point

LENGTHS = (1, 3, 5, 7)
PROMPTS = ("true", "recovered", "empty")
SEARCH_IMAGES = ("samples", "train")  # what the search denoises: the fine-tune's own samples, or its training set
TABLE_FILE = "caption_table.md"
CANDIDATES_FILE = "candidate_captions.txt"  # with Job.candidate_windows: every window the search ranks whole


@dataclasses.dataclass(frozen=True)
class Case:
    length: int
    index: int
    caption: str

    @property
    def name(self) -> str:
        return f"len{self.length}_{self.index}"


@dataclasses.dataclass(frozen=True)
class Job:
    """What every case shares. `run`: the reproduce Settings fields of the extractions (num_images,
    steps, features, ...); `search_images`: 'samples' (an auditor's view: the search samples the
    fine-tune with the empty prompt) or 'train' (the fine-tuning images themselves)."""

    pretrained: str
    workdir: str
    point: Point = Point("dreambooth", 200, 5e-4)
    seed: int = 0
    run: dict = dataclasses.field(default_factory=dict)
    search: caption_lib.CaptionConfig = caption_lib.CaptionConfig()
    search_images: str = "samples"
    candidate_windows: bool = False  # rank every window of the base's captions whole (caption.read_candidate_captions)

    def __post_init__(self):
        if self.search_images not in SEARCH_IMAGES:
            raise InputError(f"--search_images must be one of {', '.join(SEARCH_IMAGES)}, got {self.search_images!r}")


# ---- the captions -------------------------------------------------------------------------------


def vocabulary(tokenizer) -> set:
    """The words the search can propose: the tokenizer's whole-word candidates (no extra words)."""
    return {word for word, _ in caption_lib.candidate_words(tokenizer, extra_words=())}


def caption_windows(captions, words: set, length: int) -> list:
    """Every distinct run of `length` consecutive words of `captions` made only of `words`, sorted."""
    out = set()
    for caption in captions:
        tokens = caption.split()
        for start in range(len(tokens) - length + 1):
            window = tokens[start:start + length]
            if all(w in words for w in window):
                out.add(" ".join(window))
    return sorted(out)


def write_candidate_windows(workdir: str, captions, words: set, max_words: int) -> str:
    """WORKDIR/candidate_captions.txt: every window of 1..max_words words of `captions` (caption_windows),
    shortest first: the closed set an auditor of this public base can list, which holds every caption
    the rule above draws. Returns its path."""
    from finextract_jax.fileio import atomic_write_bytes

    lines = [w for length in range(1, max_words + 1) for w in caption_windows(captions, words, length)]
    path = os.path.join(workdir, CANDIDATES_FILE)
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


def parse_lengths(values) -> tuple:
    """['1', '3'] (a flag's list) -> (1, 3), duplicates dropped; each a word count >= 1."""
    try:
        lengths = tuple(dict.fromkeys(int(v) for v in values))
    except ValueError:
        raise InputError(f"--lengths: {','.join(values)!r} is not a comma list of word counts") from None
    if not lengths or min(lengths) < 1:
        raise InputError(f"--lengths: {','.join(values)!r}: give one or more word counts >= 1")
    return lengths


def pick_cases(captions, words: set, lengths, per_length: int, seed: int) -> list:
    """[Case] per the module's caption rule: index 0 of each length (in the order given), then index 1, ..."""
    if per_length < 1 or not lengths or min(lengths) < 1:
        raise InputError(f"caption lengths must be >= 1 and per_length >= 1, got {list(lengths)}, {per_length}")
    cases = []
    for length in lengths:
        windows = caption_windows(captions, words, length)
        if len(windows) < per_length:
            raise InputError(f"the training captions have {len(windows)} distinct {length}-word runs of candidate "
                             f"words; {per_length} were asked for")
        chosen = np.random.default_rng([seed, length]).choice(len(windows), per_length, replace=False)
        cases += [Case(length, i, windows[j]) for i, j in enumerate(chosen)]
    return sorted(cases, key=lambda case: case.index)  # every length's first case first: a run cut short spans them


# ---- one fine-tune --------------------------------------------------------------------------------


def case_dataset(job: Job, case: Case, splits: dict):
    """The private object set captioned with the case's caption (a folder per caption: metadata.csv
    holds it, and the fine-tune reads it there)."""
    from finextract_jax.reproduce import Dataset
    from finextract_jax.testbed import curve, data

    folder = os.path.join(job.workdir, "private", "_".join(case.caption.split()))
    curve.write_once(folder, lambda staging: data.write_private_object_set(staging, splits, case.caption))
    return Dataset("object", folder, case.caption)


def run_settings(job: Job, case: Case, dataset, role: str, prompt: str | None = None):
    """reproduce Settings of FineXtract in WORKDIR/<case>/<role>: 'true' fine-tunes and extracts with
    the caption; the other roles extract with `prompt` on the true run's fine-tune."""
    from finextract_jax.testbed.curve import reproduce_settings

    folder = os.path.join(job.workdir, case.name)
    extra = {} if role == "true" else dict(prompt=prompt, finetune_workdir=os.path.join(folder, "true"))
    return reproduce_settings(job.point, job.seed, dataset, job.pretrained, os.path.join(folder, role), job.run,
                              methods=("finextract",), **extra)


def extraction(job: Job, case: Case, dataset, role: str, prompt: str | None = None) -> dict:
    """reproduce's row (AS, A_ESR, ...) of `run_settings`."""
    from finextract_jax.reproduce import reproduce

    (row,) = reproduce(run_settings(job, case, dataset, role, prompt))
    return row


def search(job: Job, case: Case, dataset, base) -> dict:
    """The case's caption.json: read when a search with these settings finished, else searched and
    written. base(): the loaded base Pipeline."""
    from finextract_jax.fileio import changed_settings
    from finextract_jax.models.pipeline import load_finetuned
    from finextract_jax.reproduce import model_path

    path = os.path.join(job.workdir, case.name, caption_lib.CAPTION_FILE)
    want = {"settings": job.search.record(), "images": job.search_images, "true": case.caption}
    if os.path.exists(path):
        record = caption_lib.read_caption(path)
        detail = changed_settings(_search_identity(record), _search_identity(want))
        if detail:
            raise InputError(f"{path}: the search finished with other settings ({detail}); rerun with the same "
                             "flags, use a new --workdir, or delete the file to search again")
        return record
    model = model_path(run_settings(job, case, dataset, "true"), dataset, job.point.finetune)
    finetuned = load_finetuned(base(), model, lora_mode="unmerged")
    images = caption_lib.load_image_folder(dataset.train_dir, base()) if job.search_images == "train" else None
    result = caption_lib.recover_caption(base(), finetuned, images=images, config=job.search)
    caption_lib.write_caption(path, result, dict(want, finetuned=finetuned.path))
    return caption_lib.read_caption(path)


def _search_identity(record: dict) -> dict:
    """What a finished search must share with this one to be reused, named as the binary's flags."""
    settings = record.get("settings") or {}
    return dict({("search_num_images" if k == "num_images" else k): v for k, v in settings.items()},
                search_images=record.get("images"), caption=record.get("true"))


def run_case(job: Job, case: Case, splits: dict, base) -> dict:
    """One table row: fine-tune, search, and the three extractions (a prompt already extracted is not
    extracted again: a recovered caption equal to the true one, or empty, reuses that row)."""
    dataset = case_dataset(job, case, splits)
    done = {case.caption: extraction(job, case, dataset, "true")}
    record = search(job, case, dataset, base)
    recovered = record["caption"]
    done[""] = extraction(job, case, dataset, "empty", "")
    if recovered not in done:
        done[recovered] = extraction(job, case, dataset, "recovered", recovered)
    row = dict(length=case.length, index=case.index, caption=case.caption, recovered=recovered,
               recall=caption_lib.word_recall(recovered, case.caption), exact=float(recovered == case.caption),
               search_s=float(record["seconds"]), num_candidates=int(record["num_candidates"]))
    if "ranking" in record:  # 1-based place of the true caption among the listed ones kept (0: not among them)
        listed = [r["caption"] for r in record["ranking"]]
        row.update(true_rank=listed.index(case.caption) + 1 if case.caption in listed else 0,
                   num_listed=int(record["steps"][0]["candidates"]))
    for name, prompt in zip(PROMPTS, (case.caption, recovered, "")):
        row.update({f"AS_{name}": done[prompt]["AS"], f"A_ESR_{name}": done[prompt]["A_ESR"]})
    return row


def caption_table(job: Job, splits: dict, lengths=LENGTHS, per_length: int = 2) -> list:
    """Every case's row, the table rewritten after each. splits: the testbed's (data.load_splits),
    of which 'train' gives the captions and 'private' the images."""
    from finextract_jax.fileio import atomic_write_bytes
    from finextract_jax.models.pipeline import load_pipeline

    base = functools.cache(lambda: load_pipeline(job.pretrained))
    words = vocabulary(base().tokenizer)
    cases = pick_cases(splits["train"][1], words, lengths, per_length, job.seed)
    if job.candidate_windows:
        listed = write_candidate_windows(job.workdir, splits["train"][1], words, job.search.max_words)
        job = dataclasses.replace(job, search=dataclasses.replace(job.search, candidates=listed))
    path, rows = os.path.join(job.workdir, TABLE_FILE), []
    for case in cases:
        rows.append(run_case(job, case, splits, base))
        text = markdown(job, rows).encode()
        if _read(path) != text:  # a rerun that redid nothing changes nothing
            atomic_write_bytes(path, text)
    return rows


def _read(path: str) -> bytes | None:
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return f.read()


# ---- the table ----------------------------------------------------------------------------------


def per_length(rows: list) -> list:
    """Mean recall, exact rate, seconds per search and scores over each length's fine-tunes."""
    out = []
    for length in dict.fromkeys(r["length"] for r in rows):
        mine = [r for r in rows if r["length"] == length]
        mean = lambda key: sum(r[key] for r in mine) / len(mine)
        keys = ["recall", "exact", "search_s"] + [f"{s}_{p}" for s in ("AS", "A_ESR") for p in PROMPTS]
        out.append(dict(length=length, n=len(mine), **{k: mean(k) for k in keys}))
    return out


def _scores(row: dict, score: str, digits: int) -> str:
    return " / ".join(f"{row[f'{score}_{p}']:.{digits}f}" for p in PROMPTS)


def markdown(job: Job, rows: list) -> str:
    s, run = job.search, job.run
    setup = (f"Base {job.pretrained}; fine-tune {job.point.name} (seed {job.seed}) on the private object set; "
             f"search: {rows[0]['num_candidates'] if rows else '?'} candidate words"
             f"{', starting from the best whole line of ' + s.candidates if s.candidates else ''}, score {s.score}, "
             f"max {s.max_words} words, beam {s.beam}, screen {s.screen_pairs} pairs / keep {s.keep}, "
             f"{s.num_images if job.search_images == 'samples' else 'the training'} images"
             f"{' sampled' if job.search_images == 'samples' else ''} x timesteps {list(s.timesteps)}; "
             f"FineXtract N={run.get('num_images')}, {run.get('steps')} steps, {run.get('features')} features, "
             "one start noise for the three prompts. Scores: true / recovered / empty prompt.")
    lines = ["# Caption recovery on trained fine-tunes", "", setup, "",
             "| words | fine-tunes | word recall | exact | seconds/search | AS | A-ESR |",
             "|---:|---:|---:|---:|---:|---|---|"]
    for r in per_length(rows):
        lines.append(f"| {r['length']} | {r['n']} | {r['recall']:.2f} | {r['exact']:.2f} | {r['search_s']:.0f} | "
                     f"{_scores(r, 'AS', 3)} | {_scores(r, 'A_ESR', 2)} |")
    ranked = any("true_rank" in r for r in rows)
    rank_head, rank_rule = (" true caption's rank among the listed |", "---:|") if ranked else ("", "")
    lines += ["", f"| words | # | true caption | recovered | recall | search (s) | AS | A-ESR |{rank_head}",
              f"|---:|---:|---|---|---:|---:|---|---|{rank_rule}"]
    for r in rows:
        rank = (f" {r['true_rank'] or f'> {caption_lib.RANKING_KEPT}'} of {r['num_listed']} |"
                if "true_rank" in r else "")
        lines.append(f"| {r['length']} | {r['index']} | '{r['caption']}' | '{r['recovered']}' | {r['recall']:.2f} | "
                     f"{r['search_s']:.0f} | {_scores(r, 'AS', 3)} | {_scores(r, 'A_ESR', 2)} |{rank}")
    return "\n".join(lines) + "\n"
