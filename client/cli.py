"""Client sub-commands of `tidelog`: topic, produce, consume, group, perf (DESIGN.md §9).

Conventions (rpk's and kcat's): every command takes ``--bootstrap HOST:PORT[,...]`` (env
``TIDELOG_BOOTSTRAP``, default 127.0.0.1:9192) and ``--output table|json``; tables are for
people, JSON for scripts; a failure prints one line, ``error: <what>`` followed by a hint, and
exits non-zero (1 for an error from the cluster, 2 for bad arguments).

`consume` prints one JSON object per line: ``topic``, ``partition``, ``offset``, ``timestamp``
(epoch ms), ``key``, ``value``, ``headers`` (a list of ``{"key", "value"}``). Keys and values are
UTF-8 text; bytes that are not valid UTF-8 are printed as ``{"base64": "<base64 of the bytes>"}``
instead of a string, and a missing key or value is ``null``. With ``--group G`` it joins consumer
group G, reads the partitions the group assigns it from the group's committed offsets, and
commits as it goes (and on exit); ``--offset`` (a start: no ranges) then applies only where the
group has no committed offset, as in rpk. ``--pattern REGEX`` (instead of TOPIC arguments, and
only with ``--group``) subscribes to every non-internal topic whose whole name matches; topics
created later join after the next metadata refresh (``--metadata-max-age-ms``, 5 s here).

`group describe G --output json` prints ``{"group", "state", "coordinator", "assignor",
"group_epoch", "members": [{"member_id", "instance_id", "member_epoch", "state", "client_id",
"subscribed_topics", "assignment": [{"topic", "partition"}]}], "offsets": [{"topic",
"partition", "committed", "end", "lag", "member_id"}]}`` (committed/lag null where the group has
no commit). `group reset-offsets` prints its plan and changes nothing without ``--execute``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import string
import sys
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable, Sequence

from tidelog.client.admin import AdminClient
from tidelog.client.connection import DEFAULT_BOOTSTRAP, ClusterUnreachableError
from tidelog.client.consumer import Consumer
from tidelog.client.group import compile_pattern
from tidelog.client.group_reset import (
    ResetPlanEntry,
    ResetScenario,
    ResetSpec,
    parse_datetime_ms,
    parse_duration_ms,
)
from tidelog.client.offsets import (
    BoundKind,
    PartitionBounds,
    parse_offset_spec,
    resolve_end,
    resolve_start,
)
from tidelog.client.producer import Producer
from tidelog.client.types import ConsumerRecord, NewTopic, TopicPartition
from tidelog.proto.common_pb2 import ErrorCode
from tidelog.proto.errors import TidelogError

Handler = Callable[[argparse.Namespace], int]

# How long a command waits for a topic it cannot see yet (it may just have been created on another
# node) before reporting it unknown.
_TOPIC_GRACE = 1.0

_HINTS = {
    ErrorCode.UNKNOWN_TOPIC_OR_PARTITION: "list topics with `tidelog topic list`",
    ErrorCode.TOPIC_ALREADY_EXISTS: "see it with `tidelog topic describe NAME`",
    ErrorCode.INVALID_TOPIC_EXCEPTION: "topic names use letters, digits, '.', '_' and '-' (at most 249)",
    ErrorCode.INVALID_REPLICATION_FACTOR: "use -r no larger than the number of live nodes (`tidelog cluster info`)",
    ErrorCode.INVALID_PARTITIONS: "partitions can only be added, never removed",
    ErrorCode.INVALID_CONFIG: "see the valid keys with `tidelog topic describe NAME`",
    ErrorCode.MESSAGE_TOO_LARGE: "raise the topic's max.message.bytes with `tidelog topic alter-config`",
    ErrorCode.GROUP_ID_NOT_FOUND: "list groups with `tidelog group list`",
    ErrorCode.NON_EMPTY_GROUP: "stop the group's consumers first; `tidelog group describe GROUP` lists them",
    ErrorCode.COORDINATOR_NOT_AVAILABLE: "the cluster is still electing the group's coordinator; retry shortly",
    ErrorCode.UNSUPPORTED_ASSIGNOR: "use --assignor uniform or range",
    ErrorCode.FENCED_INSTANCE_ID: "another consumer uses the same --instance-id",
}


# --- shared plumbing --------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fail(message: str, hint: str | None = None, code: int = 1) -> int:
    line = f"error: {_one_line(message)}"
    if hint:
        line += f" (hint: {hint})"
    print(line, file=sys.stderr)
    return code


def _guarded(function: Handler) -> Handler:
    """Turn every expected failure into one line on stderr and a non-zero exit status."""

    def handler(args: argparse.Namespace) -> int:
        try:
            return function(args)
        except ClusterUnreachableError as exc:
            return _fail(
                f"cannot reach the cluster at {args.bootstrap}: {exc.message}",
                "start one with `tidelog cluster up`, or point --bootstrap / TIDELOG_BOOTSTRAP at it",
            )
        except TidelogError as exc:
            return _fail(str(exc), _HINTS.get(exc.code))
        except (ValueError, TypeError) as exc:
            return _fail(str(exc), code=2)
        except BrokenPipeError:
            # The reader went away (`| head`): not an error. Silence the flush at exit too.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 0

    handler.__name__ = function.__name__
    handler.__doc__ = function.__doc__
    return handler


def _common(parser: argparse.ArgumentParser, output: Sequence[str] = ("table", "json")) -> None:
    parser.add_argument(
        "--bootstrap",
        default=os.environ.get("TIDELOG_BOOTSTRAP", DEFAULT_BOOTSTRAP),
        metavar="HOST:PORT[,...]",
        help="nodes to contact first (env TIDELOG_BOOTSTRAP; default %(default)s)",
    )
    parser.add_argument(
        "--output",
        choices=output,
        default=output[0],
        help="table for people, json for scripts (default %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="how long to keep retrying an unreachable cluster or an unavailable leader (default %(default)s)",
    )


def _key_values(items: Iterable[str] | None, what: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"invalid {what} {item!r}: expected KEY=VALUE")
        result[key] = value
    return result


def _print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _json(value: Any) -> None:
    print(json.dumps(value, separators=(",", ":")))


def _admin(args: argparse.Namespace) -> AdminClient:
    return AdminClient(args.bootstrap, default_api_timeout_ms=args.timeout * 1000)


def _help(parser: argparse.ArgumentParser) -> Handler:
    def show(args: argparse.Namespace) -> int:
        parser.print_help()
        return 0

    return show


# --- registration -----------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the client commands; each sets ``handler`` to a function of the args."""
    _register_topic(subparsers)
    _register_produce(subparsers)
    _register_consume(subparsers)
    _register_group(subparsers)
    _register_perf(subparsers)


def register_cluster_info(cluster_subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`tidelog cluster info`, for the cluster room to add under its `cluster` command."""
    info = cluster_subparsers.add_parser(
        "info",
        help="show the nodes, the controller and every partition's leader, replicas and epoch",
        description="Show the nodes, the controller and every partition's leader, replicas and epoch.",
    )
    _common(info)
    info.set_defaults(handler=_guarded(cluster_info))


def _register_topic(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    topic = subparsers.add_parser("topic", help="create, list, describe, configure and delete topics")
    commands = topic.add_subparsers(dest="topic_command", metavar="COMMAND")
    topic.set_defaults(handler=_help(topic))

    create = commands.add_parser("create", help="create topics", description="Create topics.")
    create.add_argument("names", nargs="+", metavar="NAME")
    create.add_argument("-p", "--partitions", type=int, default=-1,
                        help="number of partitions (default: the cluster's default)")
    create.add_argument("-r", "--replication-factor", type=int, default=-1,
                        help="replicas per partition (default: the cluster's default)")
    create.add_argument("-c", "--config", action="append", metavar="KEY=VALUE",
                        help="a topic config, repeatable (e.g. -c retention.ms=3600000)")
    create.add_argument("--dry-run", action="store_true", help="validate only; create nothing")
    _common(create)
    create.set_defaults(handler=_guarded(topic_create))

    listing = commands.add_parser("list", help="list topics", description="List topics.")
    listing.add_argument("-i", "--internal", action="store_true", help="include internal topics")
    _common(listing)
    listing.set_defaults(handler=_guarded(topic_list))

    describe = commands.add_parser(
        "describe", help="show a topic's partitions, offsets and configs",
        description="Show topics: summary, configs, and each partition's leader, replicas, "
        "log start offset and high watermark.")
    describe.add_argument("names", nargs="+", metavar="NAME")
    describe.add_argument("-c", "--configs", action="store_true", help="print only the configs")
    describe.add_argument("-p", "--partitions", action="store_true", help="print only the partitions")
    _common(describe)
    describe.set_defaults(handler=_guarded(topic_describe))

    delete = commands.add_parser("delete", help="delete topics", description="Delete topics.")
    delete.add_argument("names", nargs="+", metavar="NAME")
    _common(delete)
    delete.set_defaults(handler=_guarded(topic_delete))

    alter = commands.add_parser(
        "alter-config", help="set or reset topic configs",
        description="Set topic configs (--set k=v) or revert them to the default (--delete k).")
    alter.add_argument("name", metavar="NAME")
    alter.add_argument("-s", "--set", action="append", metavar="KEY=VALUE", help="repeatable")
    alter.add_argument("-d", "--delete", action="append", metavar="KEY", help="repeatable")
    alter.add_argument("--dry-run", action="store_true", help="validate only; change nothing")
    _common(alter)
    alter.set_defaults(handler=_guarded(topic_alter_config))

    add = commands.add_parser(
        "add-partitions", help="add partitions to a topic",
        description="Add partitions to a topic (keyed records may then map to other partitions).")
    add.add_argument("name", metavar="NAME")
    add.add_argument("-n", "--num", type=int, required=True, help="how many partitions to add")
    add.add_argument("--dry-run", action="store_true", help="validate only; change nothing")
    _common(add)
    add.set_defaults(handler=_guarded(topic_add_partitions))


def _register_produce(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    produce = subparsers.add_parser(
        "produce", help="produce one record per line of standard input",
        description="Produce one record per line read from standard input (the newline is not "
        "part of the value).")
    produce.add_argument("topic", metavar="TOPIC")
    produce.add_argument("-k", "--key", help="the key of every record")
    produce.add_argument("-K", "--key-separator", "--key-delimiter", dest="key_separator",
                         metavar="SEP",
                         help="split each line at the first SEP into key and value "
                         "(a line without SEP gets no key)")
    produce.add_argument("-p", "--partition", type=int, help="produce to this partition only")
    produce.add_argument("-H", "--header", action="append", metavar="KEY=VALUE",
                         help="a header on every record, repeatable")
    produce.add_argument("--acks", default="all", choices=("0", "1", "all", "-1"),
                         help="(default %(default)s)")
    produce.add_argument("--compression", default="lz4", choices=("none", "gzip", "lz4"),
                         help="(default %(default)s)")
    produce.add_argument("--linger-ms", type=float, default=5.0, help="(default %(default)s)")
    _common(produce)
    produce.set_defaults(handler=_guarded(produce_command))


def _register_consume(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    consume = subparsers.add_parser(
        "consume", help="print records of topics",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print records, one JSON object per line.\n\n"
        "-o/--offset: start | end | N | +N (N after the start) | -N (N before the end) |\n"
        "  N:M (M exclusive) | N:end / :end (up to the end as of now, then exit) |\n"
        "  @T | @T1:T2 with T epoch ms, YYYY-MM-DD, ISO-8601 or a duration such as -1h.\n"
        "--pattern REGEX --group G: read every topic whose whole name matches REGEX as a member\n"
        "  of group G; topics created later join within --metadata-max-age-ms.\n"
        "Bytes that are not UTF-8 print as {\"base64\": \"...\"}.")
    consume.add_argument("topics", nargs="*", metavar="TOPIC",
                         help="topics to read (or --pattern instead)")
    consume.add_argument("-o", "--offset", default="start", help="where to start (default start)")
    consume.add_argument("-n", "--num", "--max-messages", dest="num", type=int,
                         help="exit after this many records")
    consume.add_argument("-p", "--partitions", "--partition", dest="partitions", action="append",
                         metavar="P[,P...]", help="only these partitions (repeatable)")
    consume.add_argument("-f", "--format", dest="output", choices=("json", "text"),
                         default=argparse.SUPPRESS, help="alias of --output (rpk's name)")
    consume.add_argument("-g", "--group",
                         help="consume as a member of this consumer group, committing as it goes "
                         "(-o then applies only where the group has no committed offset)")
    consume.add_argument("--pattern", metavar="REGEX",
                         help="instead of TOPIC: every topic whose whole name matches REGEX, also "
                         "those created later (internal __ topics never match); needs --group")
    consume.add_argument("--metadata-max-age-ms", type=int, default=5000,
                         help="with --pattern, how often to look for new or deleted topics "
                         "(default %(default)s)")
    consume.add_argument("--fetch-max-wait-ms", type=int, default=500, help="(default %(default)s)")
    _common(consume, output=("json", "text"))
    consume.set_defaults(handler=_guarded(consume_command))


def _register_group(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    group = subparsers.add_parser("group", help="list, describe, delete consumer groups and reset their offsets")
    commands = group.add_subparsers(dest="group_command", metavar="COMMAND")
    group.set_defaults(handler=_help(group))

    listing = commands.add_parser("list", help="list consumer groups", description="List consumer groups.")
    _common(listing)
    listing.set_defaults(handler=_guarded(group_list))

    describe = commands.add_parser(
        "describe", help="show a group's members, committed offsets and lag",
        description="Show a group: state, members and, per partition, the committed offset, the "
        "log end offset and the lag between them.")
    describe.add_argument("group", metavar="GROUP")
    _common(describe)
    describe.set_defaults(handler=_guarded(group_describe))

    delete = commands.add_parser(
        "delete", help="delete groups without members, with their committed offsets",
        description="Delete consumer groups that have no members, and their committed offsets.")
    delete.add_argument("groups", nargs="+", metavar="GROUP")
    _common(delete)
    delete.set_defaults(handler=_guarded(group_delete))

    reset = commands.add_parser(
        "reset-offsets", help="plan (and with --execute, commit) new offsets for a group",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compute new committed offsets for a group and print the plan; nothing "
        "changes unless --execute is given,\nand execution is refused while the group has live "
        "members (stop its consumers first).\n\n"
        "--topic T (every partition), T:P or T:P,P... (repeatable), or --all-topics (every "
        "partition the group\nhas committed). --to-offset and --shift-by are clamped into the "
        "partition's [start, end]; a time with\nno record at or after it resets to the end.")
    reset.add_argument("group", metavar="GROUP")
    scope = reset.add_mutually_exclusive_group(required=True)
    scope.add_argument("--topic", action="append", metavar="TOPIC[:P[,P...]]", help="repeatable")
    scope.add_argument("--all-topics", action="store_true", help="every partition the group has committed")
    target = reset.add_mutually_exclusive_group(required=True)
    target.add_argument("--to-earliest", action="store_true", help="the log start offset")
    target.add_argument("--to-latest", action="store_true", help="the log end offset")
    target.add_argument("--to-current", action="store_true", help="the committed offset (no change)")
    target.add_argument("--to-offset", type=int, metavar="N")
    target.add_argument("--shift-by", type=int, metavar="N", help="move the committed offset by N (may be negative)")
    target.add_argument("--to-datetime", metavar="ISO",
                        help="the first record at or after this time, e.g. 2024-05-01T12:00:00.000 (UTC unless a zone is given)")
    target.add_argument("--by-duration", metavar="ISO-8601",
                        help="the first record at or after now minus this duration, e.g. PT15M or P1DT2H")
    mode = reset.add_mutually_exclusive_group()
    mode.add_argument("--execute", action="store_true", help="commit the plan (refused while the group has members)")
    mode.add_argument("--dry-run", action="store_true", help="only print the plan (the default)")
    _common(reset)
    reset.set_defaults(handler=_guarded(group_reset_offsets))


def _register_perf(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    perf = subparsers.add_parser("perf", help="measure produce and consume throughput and latency")
    commands = perf.add_subparsers(dest="perf_command", metavar="COMMAND")
    perf.set_defaults(handler=_help(perf))

    def shared(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("topic", metavar="TOPIC")
        parser.add_argument("--num-records", type=int, default=100_000, help="(default %(default)s)")
        parser.add_argument("--record-size", type=int, default=1024, help="bytes (default %(default)s)")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
        _common(parser)

    def producing(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--throughput", type=float, default=-1,
                            help="records/s to aim for, -1 = unlimited (default %(default)s)")
        parser.add_argument("--acks", default="all", choices=("0", "1", "all", "-1"))
        parser.add_argument("--compression", default="lz4", choices=("none", "gzip", "lz4"))
        parser.add_argument("--batch-size", type=int, default=262144, help="(default %(default)s)")
        parser.add_argument("--linger-ms", type=float, default=5, help="(default %(default)s)")
        parser.add_argument("--idempotence", default="default", choices=("default", "on", "off"),
                            help="idempotent producer: on unless --acks is 0 or 1 (default), or force it")

    produce = commands.add_parser(
        "produce", help="produce records as fast as allowed and report records/s, MB/s, latency",
        description="Produce --num-records records of --record-size bytes; latency is from send() "
        "to acknowledgement.")
    shared(produce)
    producing(produce)
    produce.set_defaults(handler=_guarded(perf_produce))

    consume = commands.add_parser(
        "consume", help="read records and report records/s, MB/s, latency",
        description="Read --num-records records from --offset; latency is from each record's "
        "timestamp to its delivery by poll().")
    shared(consume)
    consume.add_argument("-o", "--offset", default="start", help="start, end or N (default start)")
    consume.set_defaults(handler=_guarded(perf_consume))

    e2e = commands.add_parser(
        "e2e", help="produce and consume at once; latency is from send() to delivery",
        description="Produce and consume --num-records records in one process; the latency is "
        "from each record's creation to its delivery to the consumer.")
    shared(e2e)
    producing(e2e)
    e2e.set_defaults(handler=_guarded(perf_e2e))


# --- topic ------------------------------------------------------------------------------------


def _each_name(args: argparse.Namespace, names: list[str], kind: str, verb: str,
               action: Callable[[AdminClient, str], object]) -> int:
    """Run ``action(admin, name)`` for every named topic or group (``kind``), report each, and
    fail if any failed."""
    rows = []
    with _admin(args) as admin:
        for name in names:
            try:
                action(admin, name)
                rows.append({kind: name, "status": "OK", "error": None})
            except ClusterUnreachableError:
                raise
            except TidelogError as exc:
                rows.append({kind: name, "status": exc.name, "error": exc.message})
    if args.output == "json":
        _json(rows)
    else:
        _print_table([kind.upper(), "STATUS"], [
            (r[kind], "OK" if r["error"] is None else f"{r['status']}: {r['error']}") for r in rows
        ])
    failed = [r for r in rows if r["error"] is not None]
    if failed:
        first = failed[0]
        code = getattr(ErrorCode, first["status"], None)
        return _fail(f"{len(failed)} of {len(rows)} {kind}(s) not {verb}: {first['status']}: {first['error']}",
                     _HINTS.get(code) if code is not None else None)
    return 0


def topic_create(args: argparse.Namespace) -> int:
    configs = _key_values(args.config, "config")
    return _each_name(args, args.names, "topic", "created", lambda admin, name: admin.create_topics(
        [NewTopic(name, args.partitions, args.replication_factor, configs)], validate_only=args.dry_run))


def topic_list(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        topics = admin.list_topics(include_internal=args.internal)
    if args.output == "json":
        _json([{"name": t.name, "internal": t.internal, "partitions": t.partition_count,
                "replication_factor": t.replication_factor} for t in topics])
    else:
        _print_table(["NAME", "PARTITIONS", "REPLICAS"] + (["INTERNAL"] if args.internal else []), [
            [t.name, t.partition_count, t.replication_factor] + ([str(t.internal).lower()] if args.internal else [])
            for t in topics
        ])
    return 0


def topic_describe(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        descriptions = admin.describe_topics(args.names, include_configs=True)
    offsets: dict[TopicPartition, tuple[int | None, int | None]] = {}
    tps = [TopicPartition(d.name, p.partition) for d in descriptions for p in d.partitions]
    if tps and not args.configs:
        with Consumer(args.bootstrap, default_api_timeout_ms=args.timeout * 1000) as consumer:
            try:
                starts = consumer.beginning_offsets(tps)
                ends = consumer.end_offsets(tps)
                offsets = {tp: (starts.get(tp), ends.get(tp)) for tp in tps}
            except TidelogError:
                offsets = {}  # leaderless partitions: describe what metadata knows
    if args.output == "json":
        _json([
            {
                "name": d.name,
                "topic_id": d.topic_id,
                "internal": d.internal,
                "partitions": [
                    {
                        "partition": p.partition,
                        "leader": p.leader,
                        "leader_epoch": p.leader_epoch,
                        "replicas": list(p.replicas),
                        "in_sync_replicas": list(p.in_sync_replicas),
                        "offline_replicas": list(p.offline_replicas),
                        "log_start_offset": offsets.get(TopicPartition(d.name, p.partition), (None, None))[0],
                        "high_watermark": offsets.get(TopicPartition(d.name, p.partition), (None, None))[1],
                        "error": p.error or None,
                    }
                    for p in d.partitions
                ],
                "configs": dict(d.configs),
            }
            for d in descriptions
        ])
        return 0
    for index, d in enumerate(descriptions):
        if index:
            print()
        sections = not args.configs and not args.partitions
        if sections:
            print("SUMMARY")
            print("=======")
            _print_table(["NAME", d.name], [
                ["ID", d.topic_id],
                ["PARTITIONS", len(d.partitions)],
                ["REPLICAS", len(d.partitions[0].replicas) if d.partitions else 0],
                ["INTERNAL", str(d.internal).lower()],
            ])
            print()
        if not args.partitions:
            if sections:
                print("CONFIGS")
                print("=======")
            _print_table(["KEY", "VALUE"], sorted(d.configs.items()))
            if sections:
                print()
        if not args.configs:
            if sections:
                print("PARTITIONS")
                print("==========")
            _print_table(
                ["PARTITION", "LEADER", "EPOCH", "REPLICAS", "ISR", "LOG-START-OFFSET", "HIGH-WATERMARK"],
                [
                    [
                        p.partition,
                        p.leader if p.leader >= 0 else "none",
                        p.leader_epoch,
                        ",".join(map(str, p.replicas)),
                        ",".join(map(str, p.in_sync_replicas)),
                        offsets.get(TopicPartition(d.name, p.partition), (None, None))[0],
                        offsets.get(TopicPartition(d.name, p.partition), (None, None))[1],
                    ]
                    for p in d.partitions
                ],
            )
    return 0


def topic_delete(args: argparse.Namespace) -> int:
    return _each_name(args, args.names, "topic", "deleted", lambda admin, name: admin.delete_topics([name]))


def topic_alter_config(args: argparse.Namespace) -> int:
    to_set = _key_values(args.set, "config")
    to_delete = list(args.delete or ())
    if not to_set and not to_delete:
        raise ValueError("nothing to change: pass --set KEY=VALUE and/or --delete KEY")
    with _admin(args) as admin:
        admin.alter_topic_configs(args.name, to_set, to_delete, validate_only=args.dry_run)
    if args.output == "json":
        _json({"topic": args.name, "set": to_set, "deleted": to_delete, "dry_run": args.dry_run})
    else:
        rows = [[k, v] for k, v in sorted(to_set.items())] + [[k, "(default)"] for k in to_delete]
        _print_table(["KEY", "NEW-VALUE"], rows)
        if args.dry_run:
            print("(dry run: nothing changed)")
    return 0


def topic_add_partitions(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        total = admin.add_partitions(args.name, args.num, validate_only=args.dry_run)
    if args.output == "json":
        _json({"topic": args.name, "added": args.num, "partitions": total, "dry_run": args.dry_run})
    else:
        _print_table(["TOPIC", "ADDED", "PARTITIONS"], [[args.name, args.num, total]])
        if args.dry_run:
            print("(dry run: nothing changed)")
    return 0


def cluster_info(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        cluster = admin.describe_cluster()
        topics = admin.describe_topics(None, include_configs=False)
    if args.output == "json":
        _json({
            "cluster_id": cluster.cluster_id,
            "controller_id": cluster.controller_id,
            "controller_voters": list(cluster.controller_voters),
            "metadata_epoch": cluster.metadata_epoch,
            "metadata_offset": cluster.metadata_offset,
            "nodes": [{"id": n.node_id, "host": n.host, "port": n.port, "rack": n.rack or None,
                       "alive": n.alive} for n in cluster.nodes],
            "partitions": [{"topic": d.name, "partition": p.partition, "leader": p.leader,
                            "leader_epoch": p.leader_epoch, "replicas": list(p.replicas),
                            "in_sync_replicas": list(p.in_sync_replicas)}
                           for d in topics for p in d.partitions],
        })
        return 0
    print(f"CLUSTER {cluster.cluster_id}  controller {cluster.controller_id}  "
          f"voters {','.join(map(str, cluster.controller_voters))}")
    print()
    _print_table(["ID", "ADDRESS", "ALIVE", "CONTROLLER"], [
        [n.node_id, n.address, str(n.alive).lower(), "*" if n.node_id == cluster.controller_id else ""]
        for n in cluster.nodes
    ])
    print()
    _print_table(["TOPIC", "PARTITION", "LEADER", "EPOCH", "REPLICAS", "ISR"], [
        [d.name, p.partition, p.leader if p.leader >= 0 else "none", p.leader_epoch,
         ",".join(map(str, p.replicas)), ",".join(map(str, p.in_sync_replicas))]
        for d in topics for p in d.partitions
    ])
    return 0


# --- group ------------------------------------------------------------------------------------


def group_list(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        groups = admin.list_groups()
    if args.output == "json":
        _json([{"group": g.group_id, "state": g.state, "coordinator": g.coordinator_id} for g in groups])
    else:
        _print_table(["GROUP", "STATE", "COORDINATOR"], [[g.group_id, g.state, g.coordinator_id] for g in groups])
    return 0


def group_describe(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        d = admin.describe_group(args.group)
    if args.output == "json":
        _json({
            "group": d.group_id,
            "state": d.state,
            "coordinator": d.coordinator_id,
            "assignor": d.assignor,
            "group_epoch": d.group_epoch,
            "members": [
                {
                    "member_id": m.member_id,
                    "instance_id": m.instance_id,
                    "member_epoch": m.member_epoch,
                    "state": m.state,
                    "client_id": m.client_id,
                    "subscribed_topics": list(m.subscribed_topics),
                    "assignment": [{"topic": tp.topic, "partition": tp.partition} for tp in m.assignment],
                }
                for m in d.members
            ],
            "offsets": [
                {"topic": o.topic, "partition": o.partition, "committed": o.committed, "end": o.end,
                 "lag": o.lag, "member_id": o.member_id}
                for o in d.offsets
            ],
        })
        return 0
    total_lag = sum(o.lag for o in d.offsets if o.lag is not None)
    _print_table(["GROUP", d.group_id], [
        ["STATE", d.state],
        ["COORDINATOR", d.coordinator_id],
        ["ASSIGNOR", d.assignor or "-"],
        ["MEMBERS", len(d.members)],
        ["TOTAL-LAG", total_lag],
    ])
    print()
    _print_table(["TOPIC", "PARTITION", "CURRENT-OFFSET", "LOG-END-OFFSET", "LAG", "MEMBER-ID"], [
        [o.topic, o.partition, o.committed, o.end, o.lag, o.member_id] for o in d.offsets
    ])
    return 0


def group_delete(args: argparse.Namespace) -> int:
    return _each_name(args, args.groups, "group", "deleted", lambda admin, name: admin.delete_group(name))


def _reset_spec(args: argparse.Namespace) -> ResetSpec:
    if args.to_earliest:
        return ResetSpec(ResetScenario.TO_EARLIEST)
    if args.to_latest:
        return ResetSpec(ResetScenario.TO_LATEST)
    if args.to_current:
        return ResetSpec(ResetScenario.TO_CURRENT)
    if args.to_offset is not None:
        if args.to_offset < 0:
            raise ValueError(f"invalid --to-offset {args.to_offset}: offsets are >= 0")
        return ResetSpec(ResetScenario.TO_OFFSET, args.to_offset)
    if args.shift_by is not None:
        return ResetSpec(ResetScenario.SHIFT_BY, args.shift_by)
    if args.to_datetime is not None:
        return ResetSpec(ResetScenario.TO_DATETIME, parse_datetime_ms(args.to_datetime))
    return ResetSpec(ResetScenario.BY_DURATION, parse_duration_ms(args.by_duration))


def _reset_scope(values: Sequence[str]) -> tuple[list[TopicPartition], list[str]]:
    """``--topic`` values: T (every partition) or T:P[,P...]."""
    partitions: list[TopicPartition] = []
    topics: list[str] = []
    for value in values:
        topic, sep, rest = value.partition(":")
        if not topic:
            raise ValueError(f"invalid --topic {value!r}: expected TOPIC or TOPIC:P[,P...]")
        if not sep:
            topics.append(topic)
            continue
        if not rest:
            raise ValueError(f"invalid --topic {value!r}: no partition after ':'")
        for p in _parse_partitions([rest]) or []:
            partitions.append(TopicPartition(topic, p))
    return partitions, topics


def group_reset_offsets(args: argparse.Namespace) -> int:
    spec = _reset_spec(args)
    if args.all_topics:
        partitions: list[TopicPartition] | None = None
        topics: list[str] = []
    else:
        partitions, topics = _reset_scope(args.topic)
    with _admin(args) as admin:
        plan: list[ResetPlanEntry] = admin.reset_offsets(
            args.group, spec, partitions, topics, execute=args.execute
        )
    if args.output == "json":
        _json({
            "group": args.group,
            "executed": bool(args.execute),
            "offsets": [{"topic": e.topic_partition.topic, "partition": e.topic_partition.partition,
                         "current": e.current, "new": e.new_offset} for e in plan],
        })
    else:
        _print_table(["GROUP", "TOPIC", "PARTITION", "CURRENT-OFFSET", "NEW-OFFSET"], [
            [args.group, e.topic_partition.topic, e.topic_partition.partition, e.current, e.new_offset]
            for e in plan
        ])
    if not args.execute:
        print("dry run: nothing changed (add --execute to commit these offsets)", file=sys.stderr)
    return 0


# --- produce ----------------------------------------------------------------------------------


def produce_command(args: argparse.Namespace) -> int:
    headers = [(k, v.encode()) for k, v in _key_values(args.header, "header").items()]
    fixed_key = args.key.encode() if args.key is not None else None
    separator = args.key_separator.encode() if args.key_separator else None
    if separator is not None and fixed_key is not None:
        raise ValueError("use either --key or --key-separator, not both")
    pending: deque[Any] = deque()
    per_partition: dict[int, list[int]] = {}
    produced = 0
    first_error: BaseException | None = None

    def settle(future: Any) -> None:
        nonlocal produced, first_error
        try:
            metadata = future.result()
        except TidelogError as exc:
            first_error = first_error or exc
            return
        produced += 1
        stats = per_partition.setdefault(metadata.partition, [0, metadata.offset, metadata.offset])
        stats[0] += 1
        stats[1] = min(stats[1], metadata.offset)
        stats[2] = max(stats[2], metadata.offset)
        if args.output == "json":
            _json({"topic": metadata.topic, "partition": metadata.partition,
                   "offset": metadata.offset, "timestamp": metadata.timestamp})

    with Producer(
        args.bootstrap,
        acks=args.acks,
        compression=args.compression,
        linger_ms=args.linger_ms,
        max_block_ms=args.timeout * 1000,
        delivery_timeout_ms=max(args.timeout * 1000, 30_000 + args.linger_ms),
    ) as producer:
        producer.partitions_for(args.topic, timeout=min(args.timeout, _TOPIC_GRACE))
        for line in sys.stdin.buffer:
            if line.endswith(b"\n"):
                line = line[:-1]
            key = fixed_key
            value = line
            if separator is not None:
                head, sep, tail = line.partition(separator)
                if sep:
                    key, value = head, tail
            pending.append(producer.send(args.topic, value, key=key, headers=headers,
                                         partition=args.partition))
            while pending and pending[0].done():
                settle(pending.popleft())
            if first_error is not None:
                break
        producer.flush()
        while pending:
            settle(pending.popleft())
    if args.output == "table":
        if per_partition:
            _print_table(["PARTITION", "RECORDS", "FIRST-OFFSET", "LAST-OFFSET"], [
                [p, s[0], s[1], s[2]] for p, s in sorted(per_partition.items())
            ])
        print(f"produced {produced} record(s) to {args.topic}")
    if first_error is not None:
        raise first_error
    return 0


# --- consume ----------------------------------------------------------------------------------


def _text_or_base64(data: bytes | None) -> Any:
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}


def record_to_json(record: ConsumerRecord) -> dict[str, Any]:
    """The documented JSON shape of one consumed record."""
    return {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": record.timestamp,
        "key": _text_or_base64(record.key),  # type: ignore[arg-type]
        "value": _text_or_base64(record.value),  # type: ignore[arg-type]
        "headers": [{"key": k, "value": _text_or_base64(v)} for k, v in record.headers],
    }


def _parse_partitions(values: Sequence[str] | None) -> list[int] | None:
    if not values:
        return None
    result = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item.isdigit():
                raise ValueError(f"invalid partition {item!r}: expected numbers like 0,2")
            result.append(int(item))
    return sorted(set(result))


def _write_record(out: Any, record: ConsumerRecord, text: bool) -> None:
    if text:
        value = record.value
        out.write(value.decode("utf-8", "backslashreplace") if value is not None else "")  # type: ignore[attr-defined]
    else:
        out.write(json.dumps(record_to_json(record), separators=(",", ":"), ensure_ascii=False))
    out.write("\n")


def consume_group(args: argparse.Namespace) -> int:
    """`consume --group`: a group member that prints what the group assigns it and commits the
    positions of what it printed (every second, and on exit)."""
    spec = parse_offset_spec(args.offset, int(time.time() * 1000))
    if spec.end is not None:
        raise ValueError(f"with --group, -o/--offset takes a start (it applies only where the group "
                         f"has no committed offset), not the range {args.offset!r}")
    if args.partitions:
        raise ValueError("with --group the group assigns the partitions: drop -p/--partitions")
    text = args.output == "text"
    out = sys.stdout
    with Consumer(
        args.bootstrap,
        group_id=args.group,
        auto_offset_reset="earliest" if spec.start.kind is BoundKind.EARLIEST else "latest",
        enable_auto_commit=True,
        auto_commit_interval_ms=1000,
        fetch_max_wait_ms=args.fetch_max_wait_ms,
        default_api_timeout_ms=args.timeout * 1000,
        # A pattern finds topics created later only at a metadata refresh: Kafka's 5 minutes
        # are too long for someone watching a terminal.
        metadata_max_age_ms=args.metadata_max_age_ms,
    ) as consumer:
        for topic in args.topics:
            consumer.partitions_for_topic(topic, timeout=min(args.timeout, _TOPIC_GRACE))

        def start_uncommitted(partitions: set[TopicPartition]) -> None:
            # Runs inside poll (the sync consumer's callbacks do): place the partitions the
            # group has never committed where -o says; the others go on from their commit.
            if spec.start.kind in (BoundKind.EARLIEST, BoundKind.LATEST):
                return  # auto_offset_reset does it
            fresh = [tp for tp, offset in consumer.committed(partitions).items() if offset is None]
            if not fresh:
                return
            beginnings, ends = consumer.beginning_offsets(fresh), consumer.end_offsets(fresh)
            times = (consumer.offsets_for_times({tp: spec.start.value for tp in fresh})
                     if spec.start.kind is BoundKind.TIMESTAMP else {})
            for tp in fresh:
                found = times.get(tp)
                bounds = PartitionBounds(beginnings[tp], ends[tp], found.offset if found is not None else None)
                consumer.seek(tp, resolve_start(spec.start, bounds))

        if args.pattern is not None:
            # A pattern names no topic to look up: reach the cluster now, so an unreachable
            # one is a one-line error rather than a member that waits in silence.
            consumer.topics()
            consumer.subscribe(pattern=args.pattern, on_assign=start_uncommitted)
        else:
            consumer.subscribe(args.topics, on_assign=start_uncommitted)
        remaining = args.num
        try:
            while remaining is None or remaining > 0:
                # Never more than asked for: what poll returns is what gets committed.
                for record in consumer.poll(500, max_records=remaining):
                    _write_record(out, record, text)
                    if remaining is not None:
                        remaining -= 1
                out.flush()
        except KeyboardInterrupt:
            pass  # leaving the `with` commits what was printed and leaves the group
    return 0


def _check_consume_sources(args: argparse.Namespace) -> None:
    """TOPIC arguments or --pattern, one of them; a pattern needs a group (rpk's --regex and
    kcat's -G subscribe as group members: the group keeps the set of partitions current)."""
    if args.pattern is not None:
        if args.topics:
            raise ValueError("give TOPIC arguments or --pattern, not both")
        if not args.group:
            raise ValueError("--pattern needs --group G: a pattern subscription reads as a member of a consumer group")
        compile_pattern(args.pattern)  # a bad regex fails here, in one line, before connecting
    elif not args.topics:
        raise ValueError("name at least one TOPIC (or --pattern REGEX with --group G)")
    if args.metadata_max_age_ms < 1:
        raise ValueError(f"--metadata-max-age-ms must be at least 1, got {args.metadata_max_age_ms}")
    if args.fetch_max_wait_ms < 0:
        raise ValueError(f"--fetch-max-wait-ms must be 0 or more, got {args.fetch_max_wait_ms}")
    if args.num is not None and args.num < 0:
        raise ValueError(f"-n/--num must be 0 or more, got {args.num}")


def consume_command(args: argparse.Namespace) -> int:
    _check_consume_sources(args)
    if args.group:
        return consume_group(args)
    spec = parse_offset_spec(args.offset, int(time.time() * 1000))
    wanted_partitions = _parse_partitions(args.partitions)
    text = args.output == "text"
    out = sys.stdout
    with Consumer(
        args.bootstrap,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=args.fetch_max_wait_ms,
        default_api_timeout_ms=args.timeout * 1000,
    ) as consumer:
        tps: list[TopicPartition] = []
        for topic in args.topics:
            partitions = consumer.partitions_for_topic(topic, timeout=min(args.timeout, _TOPIC_GRACE))
            chosen = sorted(partitions) if wanted_partitions is None else wanted_partitions
            for p in chosen:
                if p not in partitions:
                    raise TidelogError(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
                                       f"topic {topic!r} has no partition {p} (it has {len(partitions)})")
                tps.append(TopicPartition(topic, p))
        beginnings = consumer.beginning_offsets(tps)
        ends = consumer.end_offsets(tps)
        start_times: dict[TopicPartition, Any] = {}
        end_times: dict[TopicPartition, Any] = {}
        if spec.start.kind is BoundKind.TIMESTAMP:
            start_times = consumer.offsets_for_times({tp: spec.start.value for tp in tps})
        if spec.end is not None and spec.end.kind is BoundKind.TIMESTAMP:
            end_times = consumer.offsets_for_times({tp: spec.end.value for tp in tps})
        starts: dict[TopicPartition, int] = {}
        stops: dict[TopicPartition, int | None] = {}
        for tp in tps:
            found_start, found_end = start_times.get(tp), end_times.get(tp)
            bounds = PartitionBounds(
                beginnings[tp], ends[tp],
                found_start.offset if found_start is not None else None,
                found_end.offset if found_end is not None else None,
            )
            starts[tp] = resolve_start(spec.start, bounds)
            stops[tp] = resolve_end(spec.end, bounds)
        active = [tp for tp in tps if stops[tp] is None or starts[tp] < stops[tp]]  # type: ignore[operator]
        if not active:
            return 0
        consumer.assign(active)
        for tp in active:
            consumer.seek(tp, starts[tp])
        remaining = args.num
        bounded = {tp for tp in active if stops[tp] is not None}
        done: set[TopicPartition] = set()
        while remaining is None or remaining > 0:
            for record in consumer.poll(500):
                tp = record.topic_partition
                stop = stops[tp]
                if tp in done or (stop is not None and record.offset >= stop):
                    continue
                _write_record(out, record, text)
                if remaining is not None:
                    remaining -= 1
                    if remaining == 0:
                        break
            out.flush()
            if bounded:
                for tp in list(bounded - done):
                    if consumer.position(tp) >= stops[tp]:  # type: ignore[operator]
                        done.add(tp)
                        consumer.pause(tp)
                if done == set(active):
                    break
    return 0


# --- perf -------------------------------------------------------------------------------------

# Records per poll in `perf consume` and `perf e2e`: Kafka's default max.poll.records. Polls of
# 10,000 records cost more CPU per record, not less: a poll's records stay alive together, so
# past ~700 of them the garbage collector runs, walking them and promoting them to older
# generations it walks again (measured: a sixth fewer records/s than polls of 500).
_PERF_POLL_RECORDS = 500


def _percentiles(samples: list[float]) -> dict[str, float | None]:
    if not samples:
        return {"p50": None, "p95": None, "p99": None, "p999": None, "max": None}
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99), "p999": pick(0.999),
            "max": round(ordered[-1], 3)}


class _Progress:
    """A one-line progress bar on stderr, only when stderr is a terminal."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled and sys.stderr.isatty()
        self.started = time.monotonic()
        self._last = 0.0

    def update(self, done: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.2:
            return
        self._last = now
        fraction = done / self.total if self.total else 1.0
        width = 30
        filled = int(width * fraction)
        rate = done / max(now - self.started, 1e-9)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
                         f"{rate:,.0f} rec/s")
        sys.stderr.flush()

    def finish(self, done: int) -> None:
        if self.enabled:
            self.update(done, force=True)
            sys.stderr.write("\n")


def _report(kind: str, args: argparse.Namespace, count: int, byte_count: int, elapsed: float,
            latencies_ms: list[float], errors: int, cpu_seconds: float) -> None:
    result = {
        "kind": kind,
        "topic": args.topic,
        "records": count,
        "errors": errors,
        "seconds": round(elapsed, 3),
        "records_per_sec": round(count / elapsed, 1) if elapsed > 0 else None,
        "mb_per_sec": round(byte_count / elapsed / 1e6, 3) if elapsed > 0 else None,
        "latency_ms": _percentiles(latencies_ms),
        # Issue 5 asks for the client's CPU per record: this process's, all its threads
        # (the application's, the client's I/O thread and gRPC's), over the measured span.
        "client_cpu_us_per_record": round(cpu_seconds / count * 1e6, 2) if count else None,
    }
    if args.output == "json":
        _json(result)
        return
    latency = result["latency_ms"]
    print(f"{count} records in {elapsed:.2f} s: {result['records_per_sec']} records/s, "
          f"{result['mb_per_sec']} MB/s, client CPU {result['client_cpu_us_per_record']} µs/record"
          + (f", {errors} errors" if errors else ""))
    print("latency ms: " + ", ".join(f"{k} {v}" for k, v in latency.items()))


def _payload(size: int) -> bytes:
    # Random letters, as Kafka's perf tool uses: compressible a little, like real text.
    rng = random.Random(42)
    return "".join(rng.choices(string.ascii_uppercase, k=size)).encode()


def _throttle(started: float, sent: int, throughput: float) -> None:
    if throughput <= 0:
        return
    ahead = sent / throughput - (time.monotonic() - started)
    if ahead > 0.002:
        time.sleep(ahead)


def _perf_producer(args: argparse.Namespace) -> Producer:
    return Producer(
        args.bootstrap,
        acks=args.acks,
        compression=args.compression,
        batch_size=args.batch_size,
        linger_ms=args.linger_ms,
        max_block_ms=args.timeout * 1000,
        enable_idempotence={"default": None, "on": True, "off": False}[args.idempotence],
    )


def perf_produce(args: argparse.Namespace) -> int:
    payload = _payload(args.record_size)
    latencies: list[float] = []
    errors: list[BaseException] = []
    progress = _Progress(args.num_records, not args.no_progress)
    with _perf_producer(args) as producer:
        producer.partitions_for(args.topic, timeout=min(args.timeout, _TOPIC_GRACE))
        # The loop is the measuring tool's own per-record cost, counted in the client's CPU:
        # names are bound once, and the throttle and the progress bar are only called when on.
        topic, throughput, send, monotonic = args.topic, args.throughput, producer.send, time.monotonic
        track = progress.enabled
        # One callback for every record, send times by future: a closure per record (with its
        # defaults tuple) was two more objects per record in flight for the garbage collector,
        # whose passes over the records in flight are the producer's largest cost. Keyed by the
        # future itself, not its id(): no int made per lookup, and a better spread hash.
        sent_at: dict[Any, float] = {}

        def done(future: Any) -> None:
            started_at = sent_at.pop(future)
            error = future.exception()
            if error is None:
                latencies.append((monotonic() - started_at) * 1000)
            else:
                errors.append(error)

        started, cpu_started = time.monotonic(), time.process_time()
        for i in range(args.num_records):
            now = monotonic()
            future = send(topic, payload)
            sent_at[future] = now
            future.add_done_callback(done)
            if throughput > 0:
                _throttle(started, i + 1, throughput)
            if track:
                progress.update(i + 1)
        producer.flush()
        elapsed, cpu = time.monotonic() - started, time.process_time() - cpu_started
    progress.finish(args.num_records)
    count = len(latencies)
    _report("produce", args, count, count * len(payload), elapsed, latencies, len(errors), cpu)
    if errors:
        raise errors[0] if isinstance(errors[0], TidelogError) else TidelogError(
            ErrorCode.UNKNOWN_SERVER_ERROR, str(errors[0]))
    return 0


def _consume_perf_records(consumer: Consumer, args: argparse.Namespace, progress: _Progress
                          ) -> tuple[int, int, float, list[float], float]:
    """(records, bytes, seconds, latencies in ms, CPU seconds of this process)."""
    latencies: list[float] = []
    count = 0
    byte_count = 0
    started, cpu_started = time.monotonic(), time.process_time()
    idle_deadline = time.monotonic() + args.timeout
    while count < args.num_records:
        # At most a poll's worth: asking for every record still to come made one poll decode
        # everything buffered, hundreds of thousands of records alive at once.
        records = consumer.poll(200, max_records=min(args.num_records - count, _PERF_POLL_RECORDS))
        now_ms = time.time() * 1000
        if records:
            idle_deadline = time.monotonic() + args.timeout
        elif time.monotonic() > idle_deadline:
            raise TidelogError(ErrorCode.REQUEST_TIMED_OUT,
                               f"only {count} of {args.num_records} records arrived; none for {args.timeout} s")
        latencies += [now_ms - record.timestamp for record in records]
        byte_count += sum([len(record.value or b"") + len(record.key or b"")  # type: ignore[arg-type]
                           for record in records])
        count += len(records)
        progress.update(count)
    return count, byte_count, time.monotonic() - started, latencies, time.process_time() - cpu_started


def perf_consume(args: argparse.Namespace) -> int:
    progress = _Progress(args.num_records, not args.no_progress)
    with Consumer(args.bootstrap, auto_offset_reset="earliest",
                  default_api_timeout_ms=args.timeout * 1000, max_poll_records=_PERF_POLL_RECORDS) as consumer:
        partitions = consumer.partitions_for_topic(args.topic, timeout=min(args.timeout, _TOPIC_GRACE))
        tps = [TopicPartition(args.topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        spec = parse_offset_spec(args.offset, int(time.time() * 1000))
        if spec.start.kind is BoundKind.LATEST:
            consumer.seek_to_end()
        elif spec.start.kind is BoundKind.OFFSET:
            for tp in tps:
                consumer.seek(tp, spec.start.value)
        else:
            consumer.seek_to_beginning()
        count, byte_count, elapsed, latencies, cpu = _consume_perf_records(consumer, args, progress)
    progress.finish(count)
    _report("consume", args, count, byte_count, elapsed, latencies, 0, cpu)
    return 0


def perf_e2e(args: argparse.Namespace) -> int:
    payload = _payload(args.record_size)
    progress = _Progress(args.num_records, not args.no_progress)
    failure: list[BaseException] = []
    with Consumer(args.bootstrap, default_api_timeout_ms=args.timeout * 1000,
                  max_poll_records=_PERF_POLL_RECORDS) as consumer:
        partitions = consumer.partitions_for_topic(args.topic, timeout=min(args.timeout, _TOPIC_GRACE))
        tps = [TopicPartition(args.topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_end()
        for tp in tps:
            consumer.position(tp)

        def produce() -> None:
            try:
                with _perf_producer(args) as producer:
                    started = time.monotonic()
                    for i in range(args.num_records):
                        producer.send(args.topic, payload)
                        _throttle(started, i + 1, args.throughput)
            except BaseException as exc:  # reported by the main thread
                failure.append(exc)

        thread = threading.Thread(target=produce, name="perf-e2e-producer", daemon=True)
        thread.start()
        count, byte_count, elapsed, latencies, cpu = _consume_perf_records(consumer, args, progress)
        thread.join()
    progress.finish(count)
    if failure:
        raise failure[0]
    _report("e2e", args, count, byte_count, elapsed, latencies, 0, cpu)
    return 0
