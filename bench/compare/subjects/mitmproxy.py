"""mitmproxy (mitmdump in reverse mode) with an addon adding the static key
(``mitmproxy_addon.py.template``): the Python proxy reference."""

from __future__ import annotations

from pathlib import Path

from ..constants import KEY_HEADER, MITMDUMP
from ..processes import free_port
from ..templates import render_template
from ..workspace import Bench
from .subject import Started

ADDON = Path(__file__).with_name("mitmproxy_addon.py.template")


def start(bench: Bench) -> Started:
    prefix = bench.subdir("mitmproxy")
    addon = prefix / "add_key.py"
    addon.write_text(render_template(ADDON, header=repr(KEY_HEADER), key=repr(bench.key)))
    port = free_port()
    argv = [str(MITMDUMP), "--mode", f"reverse:{bench.upstream}", "--listen-host", "127.0.0.1"]
    argv += ["--listen-port", str(port), "-s", str(addon), "-q"]
    argv += ["--set", f"confdir={prefix / 'conf'}", "--set", "termlog_verbosity=warn"]
    process = bench.processes.start("mitmproxy", argv, cpus=bench.proxy_cpus)
    return Started(f"http://127.0.0.1:{port}", [process])
