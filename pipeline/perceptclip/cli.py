"""The ``perceptclip`` command line. Thin: each command parses its arguments, loads config and calls one
library function. Heavy imports happen inside commands so ``--help`` stays fast."""

from __future__ import annotations

import json
import logging
import sys

import click

from perceptclip.core.version import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="perceptclip")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug); score and train also print "
              "Ray's own output, which otherwise goes to the Ray session's logs.")
def main(verbose: int) -> None:
    """Perceptual scores (image quality, memorability, evoked emotion) for images at scale.

    \b
    Example (score shards, look at the scores, pick a threshold, keep the best):
      perceptclip score --input 'shards/{000000..000099}.tar' --output scores --model perceptclip-iqa
      perceptclip report --scores scores --output report.html
      perceptclip quantiles --scores scores --where 'iqa > 0.6'
      perceptclip filter --scores scores --where 'iqa > 0.6' --output curated

    Each command's --help has its own example.
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # botocore's debug log prints every signed request, session token included: never below INFO
    logging.getLogger("botocore").setLevel(max(level, logging.INFO))


# --scores of report, quantiles and filter: the output of a score run
SCORES = click.option("--scores", "scores", required=True,
                      help="The --output of a perceptclip score run (folder or object-store prefix).")


@main.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--model", "-m", "models", multiple=True, required=True,
              help="Built-in name (perceptclip-iqa, perceptclip-memorability, perceptclip-emotion), a model "
                   "directory or an s3:// URI. Repeat to add each model's keys to every line; NAME=MODEL "
                   "renames a model's keys.")
@click.option("--device", default=None, help="cpu or cuda[:N]; default: cuda when available.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
def predict(images, models, device, batch_size):
    """Score IMAGES and print one JSON object per line.

    \b
    Example:
      perceptclip predict photo.jpg other.png --model perceptclip-iqa --model perceptclip-emotion
      {"path": "photo.jpg", "iqa": 0.71, "emotion": "awe", "emotion_probs": {"amusement": 0.02, ...}}

    An image that cannot be read prints {"path": ..., "error": "reason: message"}; the rest still print,
    and the exit status is 1.
    """
    from perceptclip.model.predict import load_scorers
    from perceptclip.model.predict import predict as run_predict

    scorers = _or_fail(lambda: load_scorers(models, device=device))
    failed = 0
    for row in run_predict(images, scorers, batch_size=batch_size):
        failed += "error" in row
        click.echo(json.dumps(row))
    if failed:
        raise SystemExit(1)


@main.command("import-official")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--task", required=True, type=click.Choice(["iqa", "memorability", "emotion"]))
@click.option("--output", "-o", required=True, help="Model directory to write (local path or s3:// URI).")
def import_official(checkpoint, task, output):
    """Convert a released PerceptCLIP checkpoint (.pth) into a model directory.

    \b
    Example:
      perceptclip import-official perceptCLIP_IQA.pth --task iqa --output models/iqa
      perceptclip predict photo.jpg --model models/iqa

    The architecture is read from the tensor shapes; the file is loaded with weights_only=True, so a
    pickle that carries code is refused.
    """
    from perceptclip.model.official import import_official as convert
    from perceptclip.output.destination import check_apart

    _or_fail(lambda: check_apart("--output", output, {"the checkpoint": [checkpoint]}))
    meta = _or_fail(lambda: convert(checkpoint, task, output))
    click.echo(f"wrote {output} ({meta.task.name}, {meta.model.backbone.name}, sha256 {meta.weights_sha256[:12]})")


def _or_fail(action):
    """Run ``action``; our own errors (bad file, bad model, bad config, a store that refuses after its
    retries) end the command with their message."""
    from perceptclip.core.storage import StorageError
    from perceptclip.model.errors import ArtifactError

    try:
        return action()
    except (ArtifactError, ValueError, FileNotFoundError, StorageError) as e:
        raise click.ClickException(str(e)) from None


@main.command()
@click.argument("dataset", type=click.Choice(["koniq", "lamem", "emoset", "manifest"]))
@click.argument("source")
@click.option("--output", "-o", required=True, help="Folder for the shards (local path or fsspec URL).")
@click.option("--split", default=None,
              help="lamem: train_1..test_5 (default train_1); emoset: train, val or test (default train); "
                   "koniq and manifest: a name in --fractions, or all (the default).")
@click.option("--fractions", default="train=0.8,val=0.1,test=0.1", show_default=True,
              help="koniq and manifest: the seeded random split's parts.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random split.")
@click.option("--shard-size", default=1000, show_default=True, type=click.IntRange(1), help="Samples per shard.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier conversion of the split in OUTPUT: its shards "
              "are removed first.")
@click.option("--task", default=None, help="manifest: the task its labels are for (a built-in name, or a YAML file "
              "defining one, e.g. a training config); each label must fit it, numbers or its class names.")
def convert(dataset, source, output, split, fractions, seed, shard_size, overwrite, task):
    """Write DATASET at SOURCE as WebDataset shards: key.<ext> (the original image) and key.json (label).

    \b
    Example:
      perceptclip convert lamem /data/lamem --split train_1 --output s3://bucket/lamem/train_1
      perceptclip convert manifest labels.parquet --split val --output shards/val

    SOURCE is the dataset's folder, or for manifest a CSV or Parquet file with path (or url) and label.
    A malformed line or a missing image is printed with its file and line; the others are written.
    The last line printed is a JSON summary. The exit status is 1 when nothing was written. A second
    conversion of the same split into OUTPUT is refused (it would mix two runs' shards) unless --overwrite.
    """
    from perceptclip.core.tasks import load_task
    from perceptclip.training.convert import convert as run_convert
    from perceptclip.training.convert import parse_fractions

    try:
        report = run_convert(dataset, source, output, split=split, shard_size=shard_size,
                             fractions=parse_fractions(fractions), seed=seed, overwrite=overwrite,
                             task=load_task(task) if task else None)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    for problem in report.problems:
        click.echo(str(problem), err=True)
    click.echo(json.dumps(report.to_dict()))
    if not report.written:
        raise click.ClickException(f"no sample written: {len(report.problems)} problem(s), printed above")


@main.command()
@click.option("--input", "-i", "inputs", multiple=True,
              help="Paths or URLs (s3://, gs://, any fsspec URL), brace ranges (shard-{000000..000999}.tar), "
                   "globs, a folder or prefix, or a .txt file of URLs. Repeatable.")
@click.option("--output", "-o", default=None, help="Output folder or object-store prefix.")
@click.option("--model", "-m", "models", multiple=True,
              help="Built-in name, model directory or s3:// URI; NAME=MODEL renames its columns. Repeat to "
                   "score with several models in one pass.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True), default=None,
              help="YAML score config (see configs/score.yaml); the options above override it.")
@click.option("--address", default=None, help="Ray cluster to join; default RAY_ADDRESS, else a local cluster.")
@click.option("--overwrite", is_flag=True, default=None, help="Score every shard again, committed or not.")
@click.option("--input-kind", default=None,
              help="What the inputs are: webdataset (tars), parquet (Parquet files with the images inside), "
                   "table (Parquet, CSV or JSONL of image paths or URIs), files (folders, prefixes or globs of "
                   "image files, as virtual shards recorded under OUTPUT) or auto (the default: told by each "
                   "file's name and columns; a folder of image files and no shards: files).")
@click.option("--image-column", default=None, help="Parquet: the column of images; tables: of their locations.")
@click.option("--key-column", default=None, help="Parquet and tables: the column of keys (default: __key__, key "
              "or id when present, else the row number).")
@click.option("--carry-column", "carry_columns", multiple=True, help="An input column to copy into the score "
              "table (a tar: a field of each sample's .json). Repeatable.")
@click.option("--sample-fraction", type=float, default=None,
              help="Dry run: score only this seeded random share of the shards (0 < F <= 1; the seed is "
                   "the config's sample_seed), to estimate cost and distributions before the full run.")
def score(inputs, output, models, config_path, address, overwrite, input_kind, image_column, key_column,
          carry_columns, sample_fraction):
    """Score images where they are: one Parquet table and one commit marker per input shard under OUTPUT.

    \b
    Input kinds (--input-kind; auto tells each input by its name and columns):
      webdataset  WebDataset tars, or a folder or prefix of them
      parquet     Parquet files with the images inside (Hugging Face datasets)
      table       a table (Parquet, CSV or JSONL) of image paths or URLs
      files       a folder, prefix or glob of image files, cut into virtual shards recorded under OUTPUT

    \b
    Example:
      perceptclip score --input 's3://bucket/shards/shard-{000000..000999}.tar' \\
          --output s3://bucket/scores --model perceptclip-iqa --model perceptclip-emotion
      perceptclip score --input photos.csv --image-column url --key-column id --carry-column caption \\
          --output scores --model perceptclip-iqa

    A rerun skips the shards already committed. Progress goes to stderr (a bar on a terminal, a line
    every 30 s in a log; a failed shard always); the run summary (also written under OUTPUT/_runs/) is
    printed as JSON at the end. The exit status is 1 when a shard failed.
    --sample-fraction 0.01 scores a seeded 1% of the shards first, to see cost and distributions.
    """
    from perceptclip.scoring.config import load_score_config
    from perceptclip.scoring.job import run_score

    cfg = _or_fail(lambda: load_score_config(config_path, input=list(inputs) or None, output=output,
                                             models=list(models) or None, address=address, overwrite=overwrite,
                                             input_kind=input_kind, image_column=image_column,
                                             key_column=key_column, carry_columns=list(carry_columns) or None,
                                             sample_fraction=sample_fraction))
    try:
        with _console("shards", "images") as console:
            summary = _or_fail(lambda: run_score(cfg, progress=console))
    except KeyboardInterrupt as stop:               # Ctrl-C: the summary as on success, and no "Aborted!"
        if getattr(stop, "run_summary", None) is not None:
            click.echo(json.dumps(stop.run_summary.to_dict(), indent=2))
        raise SystemExit(130) from None
    click.echo(json.dumps(summary.to_dict(), indent=2))
    if not summary.ok:
        raise SystemExit(1)


def _progress_lines():
    """Progress lines on stderr, at most one a second (an output can hold thousands of tables)."""
    from perceptclip.core.console import ThrottledLines

    return ThrottledLines(lambda line: click.echo(line, err=True))


def _console(unit: str, item: str | None):
    """The progress and messages of a long run on stderr: a bar on a terminal, lines in a log. Under -v
    Ray's own output prints too, and progress goes as lines."""
    from perceptclip.core.console import Console

    verbose = click.get_current_context().find_root().params.get("verbose", 0) > 0
    return Console(sys.stderr, unit=unit, item=item, verbose=verbose)


@main.command()
@SCORES
@click.option("--output", "-o", required=True, help="HTML file to write (local path or fsspec URL).")
@click.option("--shards", multiple=True,
              help="Where the shards are now, if they moved since scoring: paths, URLs, brace ranges, globs or "
                   "a .txt list, matched to the tables by shard name. Repeatable. Default: the URLs recorded "
                   "in the tables.")
@click.option("--top-k", default=12, show_default=True, type=click.IntRange(0),
              help="How many of the highest and of the lowest scored samples to show per model.")
def report(scores, output, shards, top_k):
    """Write one self-contained HTML page to explore the scores under SCORES and choose what to keep.

    \b
    Example:
      perceptclip report --scores s3://bucket/scores --output report.html
      perceptclip report --scores scores/ --output report.html --shards '/mnt/shards/*.tar' --top-k 24

    A threshold on each score's histogram, each classifier's classes as toggles: the page says what the
    selection keeps (as quantiles --where does), shows the images on each side of every threshold, and
    gives the selection as a filter command; #where= in its link restores it. Also per model: quantiles,
    the top and bottom samples, errors by reason, the run summaries. It needs no network or server.
    """
    from perceptclip.core.storage import storage_options
    from perceptclip.curation.report import write_report

    progress = _progress_lines()
    result = _or_fail(lambda: write_report(scores, output, shards=list(shards) or None, top_k=top_k,
                                           options=storage_options(), progress=progress))
    progress.done()
    click.echo(f"wrote {result.output} ({result.bytes / 1e6:.1f} MB, {result.thumbnails} thumbnails"
               + (f", {result.unavailable} unavailable: the page says why; --shards if the shards moved"
                  if result.unavailable else "") + ")")


@main.command()
@SCORES
@click.option("--where", "expression", default=None,
              help="A keep-expression, as perceptclip filter takes it: also print the share of samples it keeps.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def quantiles(scores, expression, as_json):
    """Print each score's quantiles and class shares, to pick a filter threshold before filtering.

    \b
    Example:
      perceptclip quantiles --scores s3://bucket/scores
      perceptclip quantiles --scores scores/ --where 'iqa > 0.6 and emotion != "fear"'

    Quantiles are over the scored samples (error rows have no scores), interpolated linearly. With
    --where, the last line says how many samples the expression keeps, of all and of the scored.
    """
    from perceptclip.core.storage import storage_options
    from perceptclip.curation.quantiles import describe_scores, format_description, read_scores

    progress = _progress_lines()
    table = _or_fail(lambda: read_scores(scores, storage_options(), progress))
    progress.done()
    description = _or_fail(lambda: describe_scores(table, where=expression))
    click.echo(json.dumps(description, indent=2) if as_json else format_description(description))


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, exists=True),
              help="YAML training config (configs/train/{iqa,memorability,emotion,smoke}.yaml).")
@click.option("--train", "train_sets", multiple=True, required=True,
              help="[NAME=]SHARDS of a training set. Repeat for multi-dataset training: one shared LoRA, "
                   "one head per NAME.")
@click.option("--val", "val_sets", multiple=True, required=True,
              help="[NAME=]SHARDS validated every epoch; NAME picks the head (one per training set).")
@click.option("--output", "-o", "dest", required=True, help="Run folder (local or s3://): checkpoints, "
              "metrics.json, and the best model in model/.")
@click.option("--init", default=None, help="Start from this model (built-in name or path) instead of the "
              "config's pretrained backbone.")
@click.option("--address", default=None, help="Ray cluster to join; default RAY_ADDRESS, else a local cluster.")
@click.option("--restart", is_flag=True, help="Discard the earlier run in OUTPUT (checkpoints, metrics, model) and "
              "start again, instead of resuming it.")
@click.option("--in-process", is_flag=True, help="Train in this process, one worker, without Ray (the config's "
              "scaling.in_process): a small run, a notebook, a debugger.")
def train(config_path, train_sets, val_sets, dest, init, address, restart, in_process):
    """Fine-tune on Ray Train; rerunning the same command resumes after the last finished epoch.

    \b
    Example:
      perceptclip train --config configs/train/iqa.yaml --train 's3://b/koniq/train-{000000..000007}.tar' \\
          --val s3://b/koniq/val-000000.tar --output s3://b/runs/iqa-1
      perceptclip score --model s3://b/runs/iqa-1/model ...

    Each epoch's score and loss are printed on stderr (with a progress bar on a terminal), its metrics
    kept in OUTPUT/metrics.json; the line on stdout is the run's summary as JSON. A rerun with another
    config or other shards is refused (--restart starts afresh); a set without a usable sample fails the
    run, naming it, and nothing is exported.
    """
    from perceptclip.training.config import TrainConfig, parse_datasets
    from perceptclip.training.train import train as run_train

    cfg = _or_fail(lambda: TrainConfig.load(config_path, in_process, init=init))
    train_map = _or_fail(lambda: parse_datasets(train_sets, "--train"))
    val_map = _or_fail(lambda: parse_datasets(val_sets, "--val"))
    with _console("epochs", None) as console:
        summary = _or_fail(lambda: run_train(cfg, train_map, val_map, dest, address=address, restart=restart,
                                             progress=console))
    click.echo(json.dumps(summary, allow_nan=False))


@main.command()
@click.option("--model", "-m", required=True, help="Built-in name, model directory or s3:// URI (REF#HEAD "
              "picks a head of a multi-dataset model).")
@click.option("--data", "data", multiple=True, required=True, help="Labelled shards (key.json holds label).")
@click.option("--output", "-o", default=None, help="Also write the metrics JSON to this file or URL.")
@click.option("--bootstrap", default=1000, show_default=True, type=click.IntRange(0),
              help="Bootstrap resamples for the 95% intervals of SRCC and PLCC (0: none).")
@click.option("--device", default=None, help="cpu or cuda[:N]; default: cuda when available.")
def evaluate(model, data, output, bootstrap, device):
    """Score labelled shards and print the metrics as JSON on the last line.

    \b
    Example:
      perceptclip evaluate --model runs/iqa-1/model --data 'koniq/test-{000000..000001}.tar'
      {"srcc": 0.91, "srcc_ci": [0.90, 0.92], "plcc": 0.93, ...}

    Regression: srcc, plcc, mse (with srcc_ci and plcc_ci); classification: accuracy, macro_f1 and the
    confusion matrix. Samples without a usable image or label are counted under errors, by reason; a
    metric that cannot be computed (no usable sample, labels all equal) fails the command, naming why.
    """
    from perceptclip.core.storage import storage_options
    from perceptclip.training.evaluate import evaluate as run_evaluate

    metrics = _or_fail(lambda: run_evaluate(model, list(data), resamples=bootstrap, device=device,
                                            storage_options=storage_options(), output=output))
    click.echo(json.dumps(metrics, allow_nan=False))


@main.command("filter")
@SCORES
@click.option("--where", "where", required=True,
              help="Keep-expression over score columns, e.g. 'iqa > 0.6 and emotion != \"fear\"'.")
@click.option("--output", "-o", required=True, help="Folder for the curated shards (local or object store).")
@click.option("--overwrite", is_flag=True, help="Remove the earlier curation in OUTPUT, then redo every shard.")
@click.option("--workers", default=4, show_default=True, type=click.IntRange(1), help="Shards in flight at once.")
@click.option("--format", "form", type=click.Choice(["auto", "webdataset"]), default="auto", show_default=True,
              help="auto: tars from tars, Parquet from Parquet, tables and folders; webdataset: tars from any kind.")
def filter_command(scores, where, output, overwrite, workers, form):
    """Write new shards holding only the samples whose scores pass --where.

    \b
    Example:
      perceptclip filter --scores s3://b/scores --where 'iqa > 0.6 and emotion in ["awe", "amusement"]' \\
          --output s3://b/curated

    The expression knows column names, numbers, quoted strings, comparisons (< <= > >= == !=),
    in / not in [list], and, or, not and parentheses; it is checked against the scores before any
    work. Each kept sample of a tar keeps its files, with its scores added to its .json; Parquet with the
    images gives Parquet of the kept rows with score columns; a table or a folder of image files gives a
    Parquet table of the kept images' locations and scores. A rerun skips shards
    already written. The summary is printed as JSON; the exit status is 1 when a shard failed.
    """
    from perceptclip.core.storage import storage_options
    from perceptclip.curation.filter import run_filter

    summary = _or_fail(lambda: run_filter(scores, where, output, storage_options(), overwrite=overwrite,
                                          workers=workers, progress=lambda line: click.echo(line, err=True),
                                          form=form))
    click.echo(json.dumps(summary.to_dict(), indent=2))
    if not summary.ok:
        raise SystemExit(1)
