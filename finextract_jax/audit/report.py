"""DIR/report.html: what an audit found, as one page that opens offline in any browser.

Self-contained on purpose: every image is a PNG thumbnail embedded as a data URI (the training
images live outside DIR, and a report is mailed or archived alone); no script, no external
style sheet, font or link. Everything it shows is read from the files the stages wrote (see
job.py's layout), so rerendering a finished audit gives the same page.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os

from finextract_jax import fileio, imageio
from finextract_jax.grids import thumbnail
from finextract_jax.sampling.run import AUTO_PROMPT

CANDIDATE_TILE = 160
MEMBER_TILE = 64
MAX_MEMBERS = 16  # members of a clique shown as thumbnails; the rest are counted

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1100px;
       color: #1b1b1b; background: #fff; padding: 0 16px; }
h1 { font-size: 1.5em; margin-bottom: 4px; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 32px; }
code, .mono { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 0.9em; word-break: break-all; }
table { border-collapse: collapse; margin: 8px 0; } td, th { border: 1px solid #ddd; padding: 4px 8px; text-align: left;
  vertical-align: top; } th { background: #f3f3f3; }
.summary { background: #f5f8ff; border: 1px solid #c9d6f2; padding: 8px 12px; }
.candidate { display: flex; gap: 16px; border: 1px solid #ddd; padding: 10px; margin: 10px 0; }
.candidate .members { display: flex; flex-wrap: wrap; gap: 4px; align-content: flex-start; }
.members img { border: 2px solid transparent; } .members img.rep { border-color: #2a62c9; }
.ok { color: #00780a; font-weight: bold; } .no { color: #a33; }
img { image-rendering: pixelated; background: #eee; } .muted { color: #666; }
"""


def _load(path: str):
    if not os.path.exists(path):
        return None
    return fileio.read_record(path, "rerun the audit to write it again")


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


class _Images:
    """Thumbnails as data URIs, each image encoded once per size."""

    def __init__(self):
        self._cache = {}

    def tag(self, path: str, tile: int, alt: str, css: str = "") -> str:
        key = (path, tile)
        if key not in self._cache:
            thumb = thumbnail(imageio.load_rgb(path), tile)
            buffer = io.BytesIO()
            thumb.save(buffer, format="PNG", optimize=True)
            self._cache[key] = (base64.b64encode(buffer.getvalue()).decode("ascii"), thumb.size)
        data, (width, height) = self._cache[key]
        return (f'<img src="data:image/png;base64,{data}" width="{width}" height="{height}" alt="{_esc(alt)}"'
                + (f' class="{css}"' if css else "") + ">")


def _table(rows, header=None) -> str:
    head = "<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _interval(settings) -> str:
    bound = settings.get("guidance_max_timestep")
    return "" if bound is None else f", guided only at t &le; {bound}"


def _summary(settings, run, clusters, metrics, caption) -> str:
    kind = {"lora": "LoRA", "dreambooth": "full (DreamBooth) fine-tune"}[settings["finetune_kind"]]
    prompt = (run or {}).get("caption", settings["prompt"]) if settings["prompt"] == AUTO_PROMPT else settings["prompt"]
    parts = [f"Fine-tuned checkpoint <code>{_esc(settings['finetuned'])}</code> ({kind}) against "
             f"<code>{_esc(settings['pretrained'])}</code>.",
             f"{settings['num_images']} images sampled with {_esc(settings['method'])} "
             f"(w={settings['guidance_scale']:g}, k={settings['correction']:g}, {settings['steps']} "
             f"{_esc(settings['sampler'])} steps{_interval(settings)}), prompt <b>{_esc(repr(prompt))}</b>"
             + (" (recovered)" if caption else "") + "."]
    if clusters:
        count = len(clusters["cliques"])
        schedule = f", {_esc(clusters['schedule'])} schedule" if clusters.get("schedule") else ""
        parts.append(f"Clustering ({_esc(settings['features'])} features, select {_esc(settings['select'])}{schedule}) "
                     f"kept {count} clique{'s' * (count != 1)} at similarity threshold {clusters['threshold']:.3f}; "
                     f"the {min(settings['num_train'], count)} largest are shown below.")
    if metrics:
        hits = sum(m["similarity"] > metrics["success_threshold"] for m in metrics["per_image"])
        parts.append(f"Against the {len(metrics['per_image'])} training images: <b>AS {metrics['AS']:.3f}</b>, "
                     f"<b>A-ESR {metrics['A_ESR']:.3f}</b> ({hits} extracted at similarity &gt; "
                     f"{metrics['success_threshold']:g}).")
    return '<p class="summary">' + "<br>".join(parts) + "</p>"


def _ranked_cliques(clusters) -> list:
    """[(clique, representative index)], largest clique first (ties: peel order)."""
    pairs = list(zip(clusters["cliques"], clusters["representatives"]))
    return sorted(pairs, key=lambda pair: -len(pair[0]))


def _candidates(workdir, settings, clusters, metrics, images: _Images) -> str:
    if not clusters:
        return "<p class='muted'>Not clustered yet.</p>"
    names = clusters["images"]
    matched = {}
    for m in (metrics or {}).get("per_image", []):
        matched.setdefault(m["match"], []).append(m)
    ranked = _ranked_cliques(clusters)
    shown = ranked[: settings["num_train"]]
    out = [f"<p>Each candidate is the member of a clique of near-duplicate samples nearest its centre; a large "
           f"clique means the model keeps producing that image. Showing {len(shown)} of {len(ranked)} cliques "
           f"(all representatives are in <code>extracted/</code>).</p>"]
    for rank, (clique, rep) in enumerate(shown, 1):
        rep_name = names[rep]
        members = sorted(clique)
        thumbs = [images.tag(os.path.join(workdir, "images", names[i]), MEMBER_TILE, names[i],
                             "rep" if i == rep else "") for i in members[:MAX_MEMBERS]]
        more = f"<span class='muted'>+ {len(members) - MAX_MEMBERS} more</span>" if len(members) > MAX_MEMBERS else ""
        hits = matched.get(rep_name, [])  # extract's NNNNN.png keep their names in extracted/
        match_text = "".join(f"<br>best match of <code>{_esc(m['train'])}</code> ({m['similarity']:.3f})" for m in hits)
        out.append(f"<div class='candidate' id='candidate-{rank}'><div>"
                   f"{images.tag(os.path.join(workdir, 'images', rep_name), CANDIDATE_TILE, rep_name)}<br>"
                   f"<b>#{rank}</b>: clique of {len(clique)}<br><code>{_esc(rep_name)}</code>{match_text}</div>"
                   f"<div class='members'>{''.join(thumbs)}{more}</div></div>")
    return "".join(out)


def _matches(workdir, settings, metrics, images: _Images) -> str:
    if not metrics:
        return ("<p class='muted'>No training images given: rerun the same command with "
                "<code>--train_dir=DIR</code> to score the candidates against them.</p>")
    threshold = metrics["success_threshold"]
    rows = []
    for m in metrics["per_image"]:
        ok = m["similarity"] > threshold
        rows.append([images.tag(os.path.join(settings["train_dir"], m["train"]), CANDIDATE_TILE, m["train"])
                     + f"<br><code>{_esc(m['train'])}</code>",
                     images.tag(os.path.join(workdir, "extracted", m["match"]), CANDIDATE_TILE, m["match"])
                     + f"<br><code>{_esc(m['match'])}</code>",
                     f"{m['similarity']:.3f}",
                     "<span class='ok'>extracted</span>" if ok else "<span class='no'>not extracted</span>"])
    head = (f"<p>AS (mean best-match similarity) <b>{metrics['AS']:.4f}</b>; A-ESR (share of training images "
            f"whose best match has similarity &gt; {threshold:g}) <b>{metrics['A_ESR']:.4f}</b>; "
            f"{_esc(metrics.get('features', ''))} features.</p>")
    return head + _table(rows, ["training image", "best match among the candidates", "similarity", ""])


def _caption(settings, caption) -> str:
    if settings["prompt"] != AUTO_PROMPT:
        given = settings["prompt"]
        return f"<p>Given by <code>--prompt</code>: <b>{_esc(repr(given))}</b>" + (
            " (unconditional extraction)" if not given else "") + ".</p>"
    if not caption:
        return "<p class='muted'>Not recovered yet.</p>"
    rows = [[_esc(step.get("caption", step.get("word"))), f"{step.get('score', float('nan')):.5f}",
             f"{step.get('heldout_gain', float('nan')):.5f}", _step_verdict(step)] for step in caption.get("steps", [])]
    min_gain = caption.get("settings", {}).get("min_gain", 0)
    if "ranking" in caption:
        listed = caption["steps"][0].get("candidates")
        how = (f"The best of {listed} listed candidate captions is taken when it lowers the fine-tuned model's "
               f"denoising error on held-out noise by more than {min_gain:g} (relative) against the empty prompt; "
               "then each word is retried with every candidate word.")
    else:
        how = ("The caption grows one word at a time; a word is kept when it lowers the fine-tuned model's "
               f"denoising error on held-out noise by more than {min_gain:g} (relative).")
    return (f"<p>Recovered caption: <b>{_esc(repr(caption['caption']))}</b> "
            f"({caption.get('num_candidates')} candidate words, {caption.get('seconds', 0):.1f} s). {how}</p>"
            + _table(rows, ["caption tried", "score", "held-out gain", ""]))


def _step_verdict(step: dict) -> str:
    if step.get("refine"):
        return f"refined: replaced {_esc(repr(step.get('replaces')))}"
    return "kept" if step.get("accepted", True) else "rejected (stop)"


def _provenance(workdir, provenance, run) -> str:
    out = []
    for flag in ("pretrained", "finetuned"):
        entry = (provenance or {}).get(flag)
        if not entry:
            continue
        rows = [[f"<code>{_esc(f['file'])}</code>", f"{f['bytes']:,}", f"<span class='mono'>{f['sha256']}</span>"]
                for f in entry["files"]]
        out.append(f"<h3>--{flag} <code>{_esc(entry['path'])}</code></h3>" + _table(rows, ["file", "bytes", "sha256"]))
    if run:
        versions = [[_esc(k), _esc(v)] for k, v in sorted(run.get("versions", {}).items())]
        devices = run.get("devices", {})
        out.append("<h3>Software and hardware</h3>" + _table(versions, ["package", "version"]) +
                   f"<p>Devices: {devices.get('count')} x {_esc(', '.join(devices.get('kinds', [])))} "
                   f"({_esc(devices.get('platform'))}); sampler {_esc(run.get('sampler', ''))}; "
                   f"fusion {_esc(run.get('fusion', ''))}; extraction started {_esc(run.get('created', ''))}.</p>")
    seconds = []
    for stage in ("extract", "cluster", "evaluate"):
        done = _load(os.path.join(workdir, f"{stage}.done.json"))
        if done:
            seconds.append([stage, f"{done['seconds']:.1f}", _esc(done.get("finished", ""))])
    if seconds:
        out.append("<h3>Stages</h3>" + _table(seconds, ["stage", "seconds", "finished"]))
    return "".join(out)


def render(workdir: str, settings: dict) -> str:
    """The report's HTML from the files in `workdir` and the run's resolved `settings`."""
    load = lambda name: _load(os.path.join(workdir, name))
    run, clusters, metrics = load("run.json"), load("clusters.json"), load("metrics.json")
    caption, provenance = load("caption.json"), load("provenance.json")
    images = _Images()
    setting_rows = [[f"<code>--{_esc(k)}</code>", f"<code>{_esc(json.dumps(v))}</code>"] for k, v in settings.items()]
    title = f"FineXtract audit: {os.path.basename(os.path.normpath(settings['finetuned']))}"
    sections = [
        ("Summary", _summary(settings, run, clusters, metrics, caption)),
        ("Training images and their best matches", _matches(workdir, settings, metrics, images)),
        ("Candidate training images, by clique size", _candidates(workdir, settings, clusters, metrics, images)),
        ("Caption", _caption(settings, caption)),
        ("Settings", _table(setting_rows, ["flag", "value"])),
        ("Provenance", _provenance(workdir, provenance, run)),
    ]
    body = "".join(f"<section><h2>{_esc(name)}</h2>{content}</section>" for name, content in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_esc(title)}</title><style>{STYLE}</style></head>"
            f"<body><h1>{_esc(title)}</h1>{body}</body></html>\n")


def write_report(workdir: str, settings: dict) -> str:
    """Render and write workdir/report.html atomically; returns its path."""
    path = os.path.join(workdir, "report.html")
    fileio.atomic_write_bytes(path, render(workdir, settings).encode("utf-8"))
    return path
