"""Self-contained HTML pages of ``evaluate --output`` (report.html) and ``inspect --output``
(inspect.html): one file each, every picture a base64 ``data:`` URI, nothing loaded from
anywhere, so that a report can be mailed, attached to a CI run or opened offline.

Every string from the data (class names, file paths, error texts) is escaped: folder and file
names are user input. The page's one inline style and one inline script are allowed by their
SHA-256 in a Content-Security-Policy that forbids everything else, so even a name that slipped
through unescaped could not run a script.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import logging
import os
from typing import Any, Iterable, Sequence

from .data.transforms import load_image
from .errors import ImageError, OutputError

log = logging.getLogger(__name__)

THUMBNAIL = 96  # pixels: the long side of inspect's pair thumbnails
MAX_PAIRS = 200  # pairs shown in inspect.html (all of them are in pairs.csv)

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 1em 1.5em; color: #1d1d1f; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.sub { color: #666; margin-top: 0; word-break: break-all; }
.cards { display: flex; flex-wrap: wrap; gap: 0.8em; }
.card { border: 1px solid #ddd; border-radius: 8px; padding: 0.4em 0.9em; min-width: 5.5em; }
.card .value { font-size: 1.6em; font-weight: 600; } .card .label { color: #666; font-size: 0.85em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border-bottom: 1px solid #eee; padding: 0.25em 0.7em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.path { word-break: break-all; font-family: ui-monospace, monospace; font-size: 0.85em; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th::after { content: " \\2195"; color: #aaa; }
table.sortable th[aria-sort=ascending]::after { content: " \\2191"; color: #000; }
table.sortable th[aria-sort=descending]::after { content: " \\2193"; color: #000; }
img.figure { max-width: 100%; height: auto; border: 1px solid #eee; }
.flag { color: #b00020; font-weight: 600; }
"""

# Sorts a table.sortable by the clicked header's column: by each cell's data-value when it has
# one (numbers), else by its text. Listeners, not onclick attributes: the policy forbids those.
SCRIPT = """
function sortBy(th) {
  var table = th.closest("table"), body = table.tBodies[0];
  var column = Array.prototype.indexOf.call(th.parentNode.children, th);
  var ascending = th.getAttribute("aria-sort") !== "ascending";
  table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
  th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  function key(row) {
    var cell = row.cells[column];
    return cell.hasAttribute("data-value") ? Number(cell.getAttribute("data-value")) : cell.textContent;
  }
  Array.from(body.rows).sort(function (a, b) {
    var x = key(a), y = key(b);
    var order = typeof x === "number" ? x - y : String(x).localeCompare(String(y));
    return ascending ? order : -order;
  }).forEach(function (row) { body.appendChild(row); });
}
document.querySelectorAll("table.sortable th").forEach(function (th) {
  th.tabIndex = 0;
  th.addEventListener("click", function () { sortBy(th); });
  th.addEventListener("keydown", function (event) {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); sortBy(th); }
  });
});
"""


class Markup(str):
    """HTML built here from escaped parts: inserted as it is, never escaped again."""


def esc(value: Any) -> Markup:
    """``value`` as text safe inside an element or a quoted attribute."""
    return value if isinstance(value, Markup) else Markup(html.escape(str(value), quote=True))


def _digest(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


def content_security_policy() -> str:
    """Nothing but this page's own style and script (by hash) and data: images."""
    return (f"default-src 'none'; img-src data:; style-src {_digest(STYLE)}; script-src {_digest(SCRIPT)}; "
            "base-uri 'none'; form-action 'none'")


def page(title: str, subtitle: str, sections: Iterable[str]) -> str:
    """The whole document: ``sections`` are Markup fragments."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{esc(content_security_policy())}\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{esc(title)}</title>\n<style>{STYLE}</style></head>\n"
        f"<body><h1>{esc(title)}</h1><p class=\"sub\">{esc(subtitle)}</p>\n"
        + "\n".join(sections)
        + f"\n<script>{SCRIPT}</script></body></html>\n"
    )


def section(title: str, *parts: str) -> Markup:
    return Markup(f"<section><h2>{esc(title)}</h2>" + "".join(parts) + "</section>")


def cards(items: Sequence[tuple[str, str]]) -> Markup:
    """The headline figures: (label, value) boxes."""
    return Markup('<div class="cards">' + "".join(
        f'<div class="card"><div class="value">{esc(value)}</div><div class="label">{esc(label)}</div></div>'
        for label, value in items) + "</div>")


def _cell(value: Any) -> str:
    if isinstance(value, Markup):
        return f"<td>{value}</td>"
    if isinstance(value, bool) or value is None:
        return f"<td>{esc('yes' if value else '-')}</td>"
    if isinstance(value, (int, float)):
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        return f'<td class="num" data-value="{value!r}">{shown}</td>'
    return f"<td>{esc(value)}</td>"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], sortable: bool = False, ident: str = "") -> Markup:
    """Rows of cells: numbers right-aligned (and sorted as numbers), Markup as it is, the rest escaped."""
    attrs = (f' id="{esc(ident)}"' if ident else "") + (' class="sortable"' if sortable else "")
    head = "".join(f'<th scope="col">{esc(h)}</th>' for h in headers)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return Markup(f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def key_values(values: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """A nested dict as (dotted key, scalar) rows; lists shown by their length."""
    rows: list[tuple[str, Any]] = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += key_values(value, name + ".")
        elif isinstance(value, list):
            rows.append((name, f"{len(value)} items"))
        else:
            rows.append((name, value))
    return rows


def path_text(path: str) -> Markup:
    return Markup(f'<span class="path">{esc(path)}</span>')


def image(uri: str, alt: str, css: str = "figure") -> Markup:
    return Markup(f'<img class="{esc(css)}" src="{esc(uri)}" alt="{esc(alt)}">')


def png_uri(path: str) -> str | None:
    """A PNG file as a data: URI; None when it is not there (a figure that was not drawn)."""
    try:
        with open(path, "rb") as handle:
            return "data:image/png;base64," + base64.b64encode(handle.read()).decode("ascii")
    except FileNotFoundError:
        return None


def thumbnail_uri(path: str, size: int = THUMBNAIL) -> str | None:
    """A ``size`` px JPEG of the image as a data: URI; None when it cannot be read any more."""
    try:
        picture = load_image(path)
    except (ImageError, OSError) as exc:
        log.debug("no thumbnail of %s: %s", path, exc)
        return None
    picture.thumbnail((size, size))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def write_page(path: str, text: str) -> str:
    """Write ``text`` to ``path``; returns the path."""
    try:
        # surrogateescape: a file name that is not UTF-8 is written as its own bytes, as the JSON is
        with open(path, "w", encoding="utf-8", errors="surrogateescape") as handle:
            handle.write(text)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


# --- evaluate's report.html ----------------------------------------------------------------

# report.json keys drawn by their own section; any other dict in it (open-set "unknown", ...)
# gets a key/value table, so that a new figure shows without a change here.
SHOWN_KEYS = {"macro_avg", "weighted_avg", "calibration", "abstain"}


def _figure(folder: str, name: str, alt: str) -> Markup:
    uri = png_uri(os.path.join(folder, name))
    return image(uri, alt) if uri else Markup("")


def evaluation_page(report: dict[str, Any], folder: str) -> str:
    """report.html of ``evaluate --output``: ``report`` is report.json's dict, ``folder`` holds its PNGs."""
    names = {c["label"]: c["name"] for c in report["classes"]}

    def name(label: str) -> str:
        return names.get(label, label)

    k = report["top_k"]
    headline = [("accuracy", f"{report['accuracy']:.1%}"), (f"top-{k} accuracy", f"{report['top_k_accuracy']:.1%}"),
                ("macro F1", f"{report['macro_avg']['f1']:.3f}"), ("weighted F1", f"{report['weighted_avg']['f1']:.3f}"),
                ("ECE", f"{report['ece']:.4f}"), ("NLL", f"{report['nll']:.4f}"), ("images", str(report["images"]))]
    sections = [Markup(f'<div id="headline">{cards(headline)}</div>')]
    per_class = table(["class", "name", "precision", "recall", "F1", "support"],
                      ([r["label"], name(r["label"]), r["precision"], r["recall"], r["f1"], r["support"]]
                       for r in report["per_class"]), sortable=True, ident="per-class")
    averages = table(["average", "precision", "recall", "F1"],
                     ([avg.replace("_", " "), report[avg]["precision"], report[avg]["recall"], report[avg]["f1"]]
                      for avg in ("macro_avg", "weighted_avg")))
    sections.append(section("Per class", per_class, averages))
    sections.append(section("Confusion matrix", _figure(folder, "confusion_matrix.png", "confusion matrix")))
    sections.append(_calibration_section(report, folder))
    if report["most_confused"]:
        sections.append(section("Most confused pairs", table(
            ["true", "predicted", "images"],
            ([name(c["true"]), name(c["predicted"]), c["count"]] for c in report["most_confused"]))))
    if report["most_confident_wrong"]:
        sections.append(section(
            "Most confidently wrong", _figure(folder, "most_confident_wrong.png", "most confidently wrong, with heat maps"),
            table(["confidence", "true", "predicted", "file"],
                  ([f"{w['confidence']:.1%}", name(w["true"]), name(w["predicted"]), path_text(w["path"])]
                   for w in report["most_confident_wrong"]))))
    if report.get("unreadable"):
        sections.append(section("Unreadable files", table(
            ["file", "reason"], ([path_text(u["path"]), u["error"]] for u in report["unreadable"]))))
    for key, value in report.items():
        if isinstance(value, dict) and key not in SHOWN_KEYS:
            sections.append(section(key.replace("_", " ").capitalize(), table(["figure", "value"], key_values(value))))
    return page("cnnkit evaluate", f"{report['arch']} ({report['checkpoint']}) on {report['data']}", sections)


def _calibration_section(report: dict[str, Any], folder: str) -> Markup:
    """The reliability diagram, with the fitted temperature and the abstain threshold when there are."""
    parts = [_figure(folder, "reliability.png", "reliability diagram")]
    if "calibration" in report:
        c = report["calibration"]
        parts.append(table(["", "before", "after"], [
            ["ECE", c["ece_before"], c["ece_after"]], ["NLL", c["nll_before"], c["nll_after"]],
            ["temperature", report["temperature"], c["temperature"]]]))
    if "abstain" in report:
        parts.append(table(["abstain", "value"], key_values(report["abstain"])))
    return section("Calibration", *parts)


# --- inspect's inspect.html ----------------------------------------------------------------


def _pair_side(side: dict[str, str]) -> Markup:
    return Markup(f"{_thumbnail(side['path'])}<br>{esc(side['split'])} / {esc(side['label'])}<br>{path_text(side['path'])}")


def inspection_page(report: dict[str, Any], folder: str | None = None) -> str:
    """inspect.html of ``inspect --output``: ``report`` is inspect.json's dict, ``folder`` holds its
    label_issues.png when there are label issues."""
    splits, dup = report["splits"], report["duplicates"]
    headline = [("images", str(report["images"])), ("splits", ", ".join(splits)),
                ("exact pairs", str(dup["exact_pairs"])), ("near pairs", str(dup["near_pairs"])),
                *([("similar pairs", str(dup["similar_pairs"]))] if report.get("backbone") else []),
                ("leaks (across splits)", str(dup["across_splits"])), ("label conflicts", str(dup["label_conflicts"]))]
    if "label_issues" in report:
        headline.append(("label issues", str(report["label_issues"]["issues"])))
    sections = [Markup(f'<div id="headline">{cards(headline)}</div>')]
    labels = sorted({label for s in splits.values() for label in s["classes"]})
    counts = table(["class", *splits], ([label, *(s["classes"].get(label) for s in splits.values())]
                                       for label in labels), sortable=True, ident="counts")
    shapes = table(["split", "images", "imbalance", "width (min/median/max)", "height", "modes"], (
        [name, s["images"], f"{s['imbalance']:g}x" if s["imbalance"] else "-", _spread(s["width"]), _spread(s["height"]),
         ", ".join(f"{mode} {n}" for mode, n in s["modes"].items())] for name, s in splits.items()))
    sizes = _figure(folder, "sizes.png", "image sizes per split") if folder else Markup("")
    sections.append(section("Images per split and class", counts, shapes, sizes))
    issues = [[name, "unreadable", path_text(u["path"]), u["error"]] for name, s in splits.items() for u in s["unreadable"]]
    for key, what in (("empty_classes", "empty class folder"), ("tiny", "tiny"), ("extreme_aspect", "extreme aspect")):
        issues += [[name, what, path_text(item) if key != "empty_classes" else esc(item), ""]
                   for name, s in splits.items() for item in s[key]]
    if issues:
        sections.append(section("Files worth a look", table(["split", "issue", "file", "reason"], issues, sortable=True)))
    pairs = report["pairs"]
    if pairs:
        rows = ([p["kind"], p["distance"], "" if p.get("similarity") is None else f"{p['similarity']:.3f}",
                 Markup('<span class="flag">leak</span>') if p["across_splits"] else "",
                 Markup('<span class="flag">conflict</span>') if p["label_conflict"] else "",
                 _pair_side(p["a"]), _pair_side(p["b"])] for p in pairs[:MAX_PAIRS])
        more = f"<p>{len(pairs) - MAX_PAIRS} more pairs in pairs.csv.</p>" if len(pairs) > MAX_PAIRS else ""
        columns = ["kind", "pHash bits apart", "feature cosine", "leak", "label conflict", "a", "b"]
        sections.append(section("Duplicate pairs", table(columns, rows), Markup(more)))
    if "label_issues" in report:
        sections.append(_label_issues_section(report["label_issues"], folder))
    similar = (f", feature cosine {report['similarity']:g} ({report['backbone']})" if report.get("backbone") else "")
    return page("cnnkit inspect", f"{report['data_dir']}: pHash distance {report['phash_distance']} bits{similar}",
                sections)


def _label_issues_section(found: dict[str, Any], folder: str | None) -> Markup:
    """The suspects of ``inspect --label-issues``: how they were found, the gallery, and a table
    (a thumbnail a row) of the first MAX_PAIRS."""
    names, suspects = found["names"], found["suspects"]

    def name(label: str) -> str:
        return f"{names[label]} ({label})" if label in names else label

    how = (f"{found['issues']} of {found['images']} images: cleanlab's confident learning on out-of-fold probabilities "
           f"of {found['folds']}-fold logistic-regression heads on the features of {found['backbone']} (out-of-fold accuracy "
           f"{found['out_of_fold_accuracy']:.1%}); most suspicious first.")
    rows = ([s["rank"], _thumbnail(s["path"]), name(s["given"]), s["p_given"], name(s["suggested"]), s["p_suggested"],
             s["split"], path_text(s["path"])] for s in suspects[:MAX_PAIRS])
    more = f"<p>{len(suspects) - MAX_PAIRS} more in label_issues.csv.</p>" if len(suspects) > MAX_PAIRS else ""
    gallery = _figure(folder, "label_issues.png", "the most suspicious images") if folder and suspects else Markup("")
    listed = table(["rank", "image", "given", "p(given)", "suggested", "p(suggested)", "split", "file"], rows,
                   sortable=True, ident="label-issues") if suspects else Markup("")
    return section("Label issues", Markup(f"<p>{esc(how)}</p>"), gallery, listed, Markup(more))


def _thumbnail(path: str) -> Markup:
    uri = thumbnail_uri(path)
    return image(uri, path, "thumb") if uri else Markup("(cannot be read now)")


def _spread(spread: dict[str, float] | None) -> str:
    return f"{spread['min']:g} / {spread['median']:g} / {spread['max']:g}" if spread else "-"
