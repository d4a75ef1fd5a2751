"""`cpm4 data ...`: UltraClean data preparation (normalize, train-classifier, filter).

Register with `add_data_commands(subparsers)` from the main parser; every command sets `func(args) -> int`
and raises ValueError / FileNotFoundError for bad input.
"""

from __future__ import annotations

import argparse
import json
import sys

from cpm4.cli import device_arg


def cmd_normalize(args: argparse.Namespace) -> int:
    from .normalize import normalize_jsonl

    n = normalize_jsonl(args.input, args.output, args.field, args.output_field)
    print(f"[cpm4] normalized {n} documents -> {args.output}", file=sys.stderr)
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    from .classifier import TrainConfig, metrics_path, train_classifier

    cfg = TrainConfig(dim=args.dim, lr=args.lr, word_ngrams=args.word_ngrams, min_count=args.min_count,
                      epoch=args.epoch, bucket=args.bucket, loss=args.loss, threads=args.threads,
                      holdout=args.holdout, seed=args.seed, threshold=args.threshold, text_field=args.field,
                      tokenizer=args.tokenizer)
    m = train_classifier(args.positive, args.negative, args.output, cfg)
    print(json.dumps({"model": str(args.output), "metrics": str(metrics_path(args.output)),
                      "holdout": m["holdout"]}, indent=1))
    return 0


def cmd_filter(args: argparse.Namespace) -> int:
    from .filter import filter_documents

    filter_documents(
        args.input, args.output, args.model, threshold=args.threshold, text_field=args.field,
        batch_size=args.batch_size, split_bytes=int(args.split_mb * 1e6) if args.split_mb > 0 else None,
        workers=args.workers, engine=args.engine, spark_master=args.spark_master, score_field=args.score_field,
        positive_label=args.positive_label, fold=not args.no_fold, overwrite=args.overwrite,
        progress=not args.quiet, crash_after=args.crash_after)
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from cpm4.data.io import input_files

    input_files(args.input)  # (as `read_documents` will: here before torch is imported and a progress bar drawn)
    from cpm4.model.tokenizer import Tokenizer
    from cpm4.train.data import tokenize_to_shards

    tok = Tokenizer.from_dir(args.tokenizer)
    index = tokenize_to_shards(args.input, tok, args.output, text_field=args.field,
                               shard_tokens=args.shard_tokens, progress=not args.quiet)
    print(f"[cpm4] {index['num_docs']} documents, {index['num_tokens']} tokens in {len(index['shards'])} "
          f"shard(s) -> {args.output}")
    return 0


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from cpm4.model.tokenizer import build_tokenizer
    from cpm4.train.data import read_documents

    tok = build_tokenizer(args.vocab_size, read_documents(args.input, args.field), model_max_length=args.max_length)
    tok.save(args.output)
    print(f"[cpm4] byte-level BPE with {tok.vocab_size} ids -> {args.output}")
    return 0


def _verify_kwargs(args: argparse.Namespace) -> dict:
    return dict(share=args.share, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                min_ratio=args.min_ratio, seeds=args.seeds, eval_rows=args.eval_rows or None, device=args.device)


def cmd_verify(args: argparse.Namespace) -> int:
    from .verify import VerifyConfig, format_report, parse_named, verify

    cfg = VerifyConfig(checkpoint=args.checkpoint, base=args.base, out=args.output,
                       candidates=parse_named(args.candidate, "--candidate"),
                       eval_sets=parse_named(args.eval, "--eval"), **_verify_kwargs(args))
    report = verify(cfg, log=lambda m: print(m, file=sys.stderr))
    print(format_report(report))
    return 0


def cmd_iterate(args: argparse.Namespace) -> int:
    from .iterate import run_round
    from .verify import parse_named

    summary = run_round(args.output, args.positive, args.negative, args.pool, args.checkpoint, args.base,
                        parse_named(args.eval, "--eval"), threshold=args.threshold, admit=args.admit,
                        confident=args.confident, field=args.field, verify_kwargs=_verify_kwargs(args),
                        classifier_kwargs={"min_count": args.min_count, "epoch": args.epoch, "lr": args.clf_lr,
                                           "seed": args.seed, "tokenizer": args.clf_tokenizer},
                        log=lambda m: print(m, file=sys.stderr))
    print(f"[cpm4] round done: kept {summary['kept']}/{summary['pool_documents']}, filtered data "
          f"{'helps' if summary['filtered_helps'] else 'does not clearly help'}; admitted "
          f"{summary['admitted_positives']} positives, {summary['admitted_negatives']} negatives -> "
          f"{args.output}/round.json")
    return 0


def _add_anneal_args(q: argparse.ArgumentParser) -> None:
    q.add_argument("--checkpoint", required=True, help="stable-phase checkpoint (HF layout) to anneal from")
    q.add_argument("--base", required=True, help="token shards of the default mix")
    q.add_argument("--eval", action="append", required=True, metavar="NAME=SHARDS", help="held-out set (repeatable)")
    q.add_argument("--share", type=float, default=0.3, help="candidate share of the annealing rows")
    q.add_argument("--steps", type=int, default=50, help="annealing (decay) steps per run")
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--seq-len", type=int, default=256)
    q.add_argument("--lr", type=float, default=0.01, help="the stable-phase learning rate the decay starts from")
    q.add_argument("--min-ratio", type=float, default=0.1, help="final learning rate / lr")
    q.add_argument("--seeds", type=int, default=3, help="repeats with different data seeds (noise estimate)")
    q.add_argument("--eval-rows", type=int, default=64, help="held-out rows per evaluation set (0 = all)")
    q.add_argument("--device", type=device_arg, default="auto",
                   help="cpu, cuda, cuda:1, ... (default: cuda if available)")


def add_data_commands(subparsers) -> argparse.ArgumentParser:
    """Add `data` with its sub-subcommands to the main parser's subparsers; returns the `data` parser."""
    data = subparsers.add_parser("data", help="pre-training data: UltraClean filtering, tokenizers, token shards",
                                 description="UltraClean: normalize text, train the fastText quality classifier, "
                                             "filter corpora with it, verify candidate data by annealing, iterate "
                                             "the seed pools; train a BPE tokenizer and tokenize into shards.")
    sub = data.add_subparsers(dest="data_command", required=True)

    q = sub.add_parser("normalize", help="UltraClean preprocessing of the text field of a JSONL file")
    q.add_argument("--input", "-i", required=True, help="JSONL file (.gz ok), or - for stdin")
    q.add_argument("--output", "-o", required=True, help="JSONL file, or - for stdout")
    q.add_argument("--field", default="text", help="text field (default: text)")
    q.add_argument("--output-field", default=None, help="write the normalized text here (default: in place)")
    q.set_defaults(func=cmd_normalize)

    q = sub.add_parser("train-classifier", help="train the fastText quality classifier",
                       description="Positives are all used; negatives are sampled with an equal share from each "
                                   "negative file, their total matched to the positives. Writes the model, "
                                   "<stem>.metrics.json and <stem>.holdout.jsonl.")
    q.add_argument("--positive", "-p", action="extend", nargs="+", required=True, help="positive JSONL/Parquet")
    q.add_argument("--negative", "-n", action="extend", nargs="+", required=True, help="negative JSONL/Parquet")
    q.add_argument("--output", "-o", required=True, help="model file, e.g. quality.bin")
    q.add_argument("--field", default="text")
    q.add_argument("--dim", type=int, default=256)
    q.add_argument("--lr", type=float, default=0.1)
    q.add_argument("--word-ngrams", type=int, default=3)
    q.add_argument("--min-count", type=int, default=5)
    q.add_argument("--epoch", type=int, default=3)
    q.add_argument("--bucket", type=int, default=200_000, help="n-gram hash buckets (model size ~ bucket*dim*4 B)")
    q.add_argument("--loss", default="softmax", choices=("softmax", "ova"))
    q.add_argument("--threads", type=int, default=0, help="0 = all cores")
    q.add_argument("--holdout", type=float, default=0.1, help="held-out share for the metrics")
    q.add_argument("--threshold", type=float, default=0.5, help="threshold for held-out precision/recall")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--tokenizer", default=None,
                   help="subword tokenizer (tokenizer.json or a model folder): words are split into its pieces")
    q.set_defaults(func=cmd_train_classifier)

    q = sub.add_parser("filter", help="keep the documents the classifier scores >= threshold",
                       description="Input: a JSONL/JSONL.gz/Parquet file or a directory of them. Output: a "
                                   "directory of part files (one per input partition), _report.json and "
                                   "_score_hist.png. Rerunning resumes an interrupted run.")
    q.add_argument("--input", "-i", required=True)
    q.add_argument("--output", "-o", required=True, help="output directory")
    q.add_argument("--model", "-m", required=True, help="fastText model from train-classifier")
    q.add_argument("--threshold", type=float, default=0.5)
    q.add_argument("--field", default="text")
    q.add_argument("--batch-size", type=int, default=1024, help="documents scored at a time (bounds memory)")
    q.add_argument("--workers", type=int, default=None, help="processes / Spark local slots (default: all cores)")
    q.add_argument("--engine", choices=("local", "spark"), default="local")
    q.add_argument("--spark-master", default=None, help="Spark master URL (default: local[WORKERS])")
    q.add_argument("--split-mb", type=float, default=256.0,
                   help="cut plain JSONL / Parquet files larger than this into partitions (0 = never)")
    q.add_argument("--score-field", default=None, help="also write the score into this field")
    q.add_argument("--positive-label", default=None, help="default: from the model's metrics.json, __label__pos")
    q.add_argument("--no-fold", action="store_true", help="score with the full model (slower; same scores)")
    q.add_argument("--overwrite", action="store_true", help="discard an earlier run with other settings")
    q.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    q.add_argument("--crash-after", type=int, default=None, help=argparse.SUPPRESS)  # testing aid
    q.set_defaults(func=cmd_filter)

    q = sub.add_parser("train-tokenizer", help="train a byte-level BPE (MiniCPM4 id layout, ChatML template)")
    q.add_argument("--input", "-i", nargs="+", required=True, help="text files (one document each) or JSONL")
    q.add_argument("--output", "-o", required=True, help="folder for tokenizer.json + tokenizer_config.json")
    q.add_argument("--vocab-size", type=int, default=8192)
    q.add_argument("--max-length", type=int, default=4096, help="model_max_length written to the config")
    q.add_argument("--field", default="text", help="JSONL text field")
    q.set_defaults(func=cmd_train_tokenizer)

    q = sub.add_parser("tokenize", help="tokenize text/JSONL into packed token shards for `cpm4 pretrain`")
    q.add_argument("--input", "-i", nargs="+", required=True, help="text files (one document each) or JSONL")
    q.add_argument("--output", "-o", required=True, help="output folder (index.json + shard-*.bin)")
    q.add_argument("--tokenizer", "-t", required=True, help="folder with the tokenizer (e.g. a checkpoint)")
    q.add_argument("--field", default="text", help="JSONL text field")
    q.add_argument("--shard-tokens", type=int, default=1 << 27, help="tokens per shard file")
    q.add_argument("--quiet", "-q", action="store_true")
    q.set_defaults(func=cmd_tokenize)

    q = sub.add_parser("verify", help="does candidate data help? anneal a stable checkpoint with and without it",
                       description="Short decay runs from a stable-phase checkpoint: the default mix alone and with "
                                   "each candidate at --share of the rows, repeated over --seeds; prints held-out "
                                   "losses and paired deltas with standard errors; writes OUTPUT/report.json.")
    _add_anneal_args(q)
    q.add_argument("--candidate", action="append", required=True, metavar="NAME=SHARDS", help="repeatable")
    q.add_argument("--output", "-o", required=True, help="folder for report.json and the runs' logs")
    q.set_defaults(func=cmd_verify)

    q = sub.add_parser("iterate", help="one seed-refinement round: classifier -> filter -> verify -> seeds",
                       description="Trains the classifier on the seed pools, splits --pool by --threshold, verifies "
                                   "kept vs unfiltered, and writes the next round's seed pools (confident "
                                   "positives/negatives admitted only if the kept data helps) into OUTPUT.")
    _add_anneal_args(q)
    q.add_argument("--positive", "-p", nargs="+", required=True, help="positive seed JSONL files")
    q.add_argument("--negative", "-n", nargs="+", required=True, help="negative seed JSONL files")
    q.add_argument("--pool", required=True, help="candidate documents (JSONL) to filter")
    q.add_argument("--output", "-o", required=True, help="the round's folder")
    q.add_argument("--threshold", type=float, default=0.5)
    q.add_argument("--admit", type=int, default=200, help="most documents admitted to each seed pool")
    q.add_argument("--confident", type=float, default=0.9, help="score >= this (or <= 1 - this) to be admitted")
    q.add_argument("--min-count", type=int, default=5, help="fastText min count")
    q.add_argument("--epoch", type=int, default=3, help="fastText epochs (small seed pools need more than 3)")
    q.add_argument("--clf-lr", type=float, default=0.1, help="fastText learning rate")
    q.add_argument("--clf-tokenizer", default=None, help="subword tokenizer for the classifier (e.g. the checkpoint)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--field", default="text")
    q.set_defaults(func=cmd_iterate)
    return data
