"""``novacron task classify`` and ``novacron task plan``.

Offline by default: the bundled ONNX model runs in this process. With
``--server URL`` (here or before the command) the coordinator's
``/api/v1/tasks/*`` routes answer instead, using the token from the settings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from novacron.coordinator.classifier.limits import MAX_BATCH, InvalidTask, check_text


class InputError(Exception):
    pass


def register(sub: argparse._SubParsersAction) -> None:
    task = sub.add_parser("task", help="classify task descriptions and plan agent swarms",
                          description="Task-complexity classifier (simple, medium, complex, "
                          "very-complex) and swarm planner. Works offline with the bundled "
                          "model unless --server is given.")
    actions = task.add_subparsers(dest="task_command", metavar="ACTION")
    for name, help_text in (("classify", "label, calibrated confidence and reasons"),
                            ("plan", "swarm plan: topology, agents, estimated duration")):
        p = actions.add_parser(name, help=help_text, description=help_text)
        p.add_argument("text", nargs="?", metavar="TEXT", help="the task in plain language")
        p.add_argument("--file", type=Path, metavar="F.jsonl",
                       help="one JSON object per line with a 'text' field ('-' for stdin)")
        p.add_argument("--json", action="store_true", help="print one JSON object per line")
        p.add_argument("--server", dest="task_server", metavar="URL",
                       help="ask this coordinator instead of the bundled model")
        p.set_defaults(func=run, task_action=name)
    task.set_defaults(func=lambda _a: (task.print_help(), 2)[1])


def read_texts(args: argparse.Namespace) -> list[str]:
    if (args.text is None) == (args.file is None):
        raise InputError("give either TEXT or --file F.jsonl")
    if args.text is not None:
        texts = [args.text]
    else:
        try:
            raw = sys.stdin.read() if str(args.file) == "-" else args.file.read_text("utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read {args.file}: {exc}") from None
        texts = []
        # split on "\n" only: str.splitlines() would also cut at U+2028 and
        # other separators that may stand raw inside a JSON string
        for n, line in enumerate(raw.split("\n"), 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except ValueError as exc:
                raise InputError(f"{args.file}:{n}: not JSON: {exc}") from None
            except RecursionError:
                raise InputError(f"{args.file}:{n}: not JSON: nested too deeply") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                raise InputError(f"{args.file}:{n}: expected an object with a string 'text'")
            texts.append(doc["text"])
        if not texts:
            raise InputError(f"{args.file}: no tasks in the file")
    for i, text in enumerate(texts):
        where = "TEXT" if args.text is not None else f"{args.file}: task {i + 1}"
        try:
            check_text(text, where)
            text.encode("utf-8")  # printed back later: lone surrogates would crash print()
        except InvalidTask as exc:
            raise InputError(str(exc)) from None
        except UnicodeEncodeError:
            raise InputError(f"{where}: not valid Unicode text (undecodable bytes or a lone "
                             "surrogate)") from None
    return texts


def _batches(texts: list[str]) -> list[list[str]]:
    """A file may hold more tasks than one call accepts: send them MAX_BATCH at a time."""
    return [texts[a:a + MAX_BATCH] for a in range(0, len(texts), MAX_BATCH)]


def _local(action: str, texts: list[str]) -> list[dict[str, Any]]:
    from novacron.coordinator.classifier.service import TaskService

    service = TaskService()
    run_batch = service.classify_many if action == "classify" else service.plan_many
    return [res for batch in _batches(texts) for res in run_batch(batch)]


def _remote(action: str, texts: list[str], server: str, token: str, ca: str = "") -> list[dict[str, Any]]:
    from novacron import tls
    from novacron.coordinator.client import CoordinatorClient

    async def go() -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []
        async with CoordinatorClient(server, token, timeout_s=60, ssl=tls.verify_context(ca)) as client:
            for batch in _batches(texts):
                doc = await client.request("POST", f"/tasks/{action}",
                                           {"tasks": [{"text": t} for t in batch]})
                results.extend(doc["results"])
        return results

    return asyncio.run(go())


def _print_human(action: str, texts: list[str], results: list[dict[str, Any]]) -> None:
    for i, (text, res) in enumerate(zip(texts, results, strict=True)):
        if i:
            print()
        short = text if len(text) <= 100 else text[:97] + "..."
        print(f"{res['label']}  (confidence {res['confidence']:.2f})  {short}")
        if action == "plan":
            team = ", ".join(f"{t['count']} {t['type']}" for t in res["team"])
            print(f"  topology {res['topology']}, strategy {res['strategy']}, "
                  f"{res['agent_count']} agents: {team}")
            print(f"  estimated duration: {res['estimated_duration']['text']}")
        for reason in res.get("reasons", []):
            print(f"  - {reason}")


def run(args: argparse.Namespace) -> int:
    from novacron.coordinator.client import ApiClientError

    try:
        texts = read_texts(args)
    except InputError as exc:
        print(f"novacron task {args.task_action}: {exc}", file=sys.stderr)
        return 2
    server = args.task_server or getattr(args, "cfg__server", None)
    try:
        if server:
            results = _remote(args.task_action, texts, server, args.settings.token, args.settings.ca)
        else:
            results = _local(args.task_action, texts)
    except ApiClientError as exc:
        print(f"novacron task {args.task_action}: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        for res in results:
            print(json.dumps(res, ensure_ascii=False))
    else:
        _print_human(args.task_action, texts, results)
    return 0
