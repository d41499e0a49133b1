"""What the engine opens, it closes: no connection to a Chroma server outlives
`Reservoir.close()`, and none is left for the interpreter to find at exit (where
Python reports each as an unclosed-socket ResourceWarning)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import urlsplit

from reservoir_middleware import Reservoir
from tests.conftest import make_settings

ROOT = Path(__file__).resolve().parents[1]


def connections_to(port: int) -> int:
    """This process's established TCP connections to 127.0.0.1:port (Linux)."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    count = 0
    for line in Path("/proc/self/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state, inode = fields[2], fields[3], fields[9]
        if state == "01" and int(remote.split(":")[1], 16) == port and inode in inodes:
            count += 1
    return count


def note(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def test_close_releases_the_connections_to_a_chroma_server(
    tmp_path: Path, chroma_server: str
) -> None:
    port = urlsplit(chroma_server).port
    assert port is not None
    before = connections_to(port)  # the session's other tests share the server
    partition = f"closing-{tmp_path.name}"
    reservoir = Reservoir(make_settings(tmp_path, chroma_url=chroma_server))
    await reservoir.add(partition, "i", note("The spare key is under the blue pot."))
    await reservoir.settle()
    assert connections_to(port) > before
    await reservoir.close()
    assert connections_to(port) == before

    # closed, not broken: the next use connects again
    assert [r.text for r in await reservoir.recent(partition, "i")] == [
        "The spare key is under the blue pot."
    ]
    await reservoir.delete(partition)
    await reservoir.close()
    assert connections_to(port) == before


def test_an_engine_left_open_leaves_no_socket_at_exit(tmp_path: Path, chroma_server: str) -> None:
    """A program that never closes its engine: its connections are closed when the
    engine is dropped or the interpreter exits, not found open by the interpreter."""
    script = textwrap.dedent(
        """
        import asyncio, sys
        from pathlib import Path
        from reservoir_middleware import Reservoir, ReservoirSettings

        async def main() -> None:
            settings = ReservoirSettings(data_dir=Path(sys.argv[1]), chroma_url=sys.argv[2])
            reservoir = Reservoir(settings)
            await reservoir.add(sys.argv[3], "i", [{"role": "user", "content": "Hello."}])
            await reservoir.settle()
            await reservoir.delete(sys.argv[3])

        asyncio.run(main())
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RSV_")}
    env["RSV_CONFIG_FILE"] = str(tmp_path / "no-config.toml")
    command = [sys.executable, "-W", "always::ResourceWarning", "-c", script]
    command += [str(tmp_path / "memory"), chroma_server, f"exit-{tmp_path.name}"]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, timeout=120)
    stderr = done.stderr.decode(errors="replace")
    assert done.returncode == 0, stderr
    assert "ResourceWarning" not in stderr, stderr
