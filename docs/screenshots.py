"""Make docs/waterfall.png and docs/tree.png from a real run: a local mesh, headless Chromium for both pictures.

    python3 docs/screenshots.py        (needs chromium; takes a few seconds)
"""

import html
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SIMPLEMESH = os.path.join(HERE, "..", "simplemesh.py")
PORT = 19390
ROUTE = "a;parallel/(b/c)~(d/c)~(e)"
COLORS = {"31": "#e05252", "32": "#4cc46a", "33": "#e0a030", "2": "#8a8a8a"}


def chromium(url, output, size, profile):
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={size}",
                    f"--screenshot={output}", url], check=True, capture_output=True, timeout=60)


def ansi_to_html(text):
    """The few SGR codes render_tree uses, as spans on a dark terminal background."""
    out, open_spans = [], 0
    for part in re.split(r"(\033\[[0-9;]*m)", text):
        code = re.fullmatch(r"\033\[([0-9;]*)m", part)
        if not code:
            out.append(html.escape(part))
        elif code.group(1) == "0":
            out.append("</span>" * open_spans)
            open_spans = 0
        else:
            style = "font-weight:bold" if code.group(1) == "1" else f"color:{COLORS[code.group(1)]}"
            out.append(f'<span style="{style}">')
            open_spans += 1
    return "".join(out)


def main():
    env = dict(os.environ, TRACE_UI_URL="http://localhost:16686/trace/{trace_id}")
    mesh = subprocess.Popen([sys.executable, SIMPLEMESH, "mesh", "--port", str(PORT), "a", "b;delay=40ms",
                             "c;delay=60ms..90ms", "d;error=1;status=503", "e;delay=20ms"],
                            env=env, stdout=subprocess.DEVNULL)
    try:
        time.sleep(1.5)
        url = f"http://127.0.0.1:{PORT}/{ROUTE}"
        for _ in range(3):  # warm the connection pools, as a mesh that has been running is
            subprocess.run([sys.executable, SIMPLEMESH, "call", url], capture_output=True)
        with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
            chromium(url, os.path.join(HERE, "waterfall.png"), "1280,320", profile)
            tree = subprocess.run(["script", "-qec", f"{sys.executable} {SIMPLEMESH} call '{url}'", "/dev/null"],
                                  capture_output=True, text=True, env=dict(env, TERM="xterm")).stdout
            page = os.path.join(profile, "tree.html")
            with open(page, "w", encoding="utf-8") as file:
                file.write('<body style="margin:0;background:#1e1e1e"><pre style="margin:0;padding:14px 18px;'
                           'font:15px/1.35 monospace;color:#ddd">$ python3 simplemesh.py call '
                           f"'{html.escape(url)}'\n{ansi_to_html(tree.replace(chr(13), ''))}</pre>")
            chromium("file://" + page, os.path.join(HERE, "tree.png"), "880,230", profile)
    finally:
        mesh.terminate()
        mesh.wait()


if __name__ == "__main__":
    main()
