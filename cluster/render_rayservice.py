"""Embed configs/serve.yaml in cluster/kuberay/rayservice.yaml as the RayService's `serveConfigV2`.

KubeRay takes the Serve config as a YAML string inside the manifest. This script copies the text of
configs/serve.yaml there verbatim (comments included), so `serve run configs/serve.yaml`, `python jobs/serve.py`
and the RayService deploy the same application with the same settings. Only the `serveConfigV2` block of the
manifest is rewritten; the rest of the file, comments included, is left as it is.

    python cluster/render_rayservice.py            # update the manifest from configs/serve.yaml
    python cluster/render_rayservice.py --check    # exit 1, saying so, if the manifest is out of date
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = REPO_ROOT / "configs" / "serve.yaml"
MANIFEST = REPO_ROOT / "cluster" / "kuberay" / "rayservice.yaml"

_KEY = re.compile(r"^(?P<indent> *)serveConfigV2:.*$")


# configs/serve.yaml listens on this machine only; in the cluster the Service reaches the proxies on every
# interface, and /caption needs the token of the stgpt-serve Secret (STGPT_SERVE_TOKEN in the pods' env).
_LOCAL_HOST = re.compile(r"^(?P<indent>  )host: 127\.0\.0\.1\b.*$")
CLUSTER_HOST_LINE = "  host: 0.0.0.0          # in the cluster: reached through the Service; /caption needs the token"


def normalized(serve_text: str) -> str:
    """The Serve config text as the manifest holds it: trailing blank lines and line-end spaces dropped, and
    `http_options.host` opened from 127.0.0.1 to 0.0.0.0."""
    lines = [line.rstrip() for line in serve_text.expandtabs().splitlines()]
    lines = [CLUSTER_HOST_LINE if _LOCAL_HOST.match(line) else line for line in lines]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) + "\n"


def render(manifest_text: str, serve_text: str) -> str:
    """`manifest_text` with its `serveConfigV2:` value replaced by `serve_text` as a literal block scalar."""
    body = normalized(serve_text)
    first = next((line for line in body.splitlines() if line), "")
    if first.startswith(" "):
        raise ValueError("the Serve config's first line is indented; a literal block cannot start that way")
    yaml.safe_load(body)  # a broken Serve config fails here, not in the cluster
    lines = manifest_text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if _KEY.match(line.rstrip("\n"))]
    if len(starts) != 1:
        raise ValueError(f"expected one serveConfigV2 key in the manifest, found {len(starts)}")
    start = starts[0]
    key_indent = len(_KEY.match(lines[start].rstrip("\n")).group("indent"))
    end = start + 1  # the old value: the following blank or more deeply indented lines
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip(" ")) > key_indent):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():  # blank lines before the next key stay outside
        end -= 1
    pad = " " * (key_indent + 2)
    block = [f"{' ' * key_indent}serveConfigV2: |\n"]
    block += [f"{pad}{line}\n" if line else "\n" for line in body.splitlines()]
    rendered = "".join(lines[:start] + block + lines[end:])
    embedded = yaml.safe_load(rendered)["spec"]["serveConfigV2"]
    if embedded != body:  # pragma: no cover - a bug in this function
        raise AssertionError("the rendered serveConfigV2 does not read back as configs/serve.yaml")
    return rendered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that the manifest is up to date")
    parser.add_argument("--serve-config", type=Path, default=SERVE_CONFIG, help="default: %(default)s")
    parser.add_argument("--manifest", type=Path, default=MANIFEST, help="default: %(default)s")
    args = parser.parse_args(argv)
    current = args.manifest.read_text()
    rendered = render(current, args.serve_config.read_text())
    if args.check:
        if rendered != current:
            print(f"{args.manifest} is out of date with {args.serve_config}: run python cluster/render_rayservice.py",
                  file=sys.stderr)
            return 1
        print(f"{args.manifest} embeds {args.serve_config}")
        return 0
    if rendered != current:
        args.manifest.write_text(rendered)
        print(f"updated {args.manifest} from {args.serve_config}")
    else:
        print(f"{args.manifest} already embeds {args.serve_config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
