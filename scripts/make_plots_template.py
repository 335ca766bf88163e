"""Write .dvc/plots_template.html: DVC's plots page with the charting scripts inlined, so that
`dvc plots show` and `dvc plots diff` work on a machine without internet.

    python scripts/make_plots_template.py        # after a version bump of vl-convert-python

DVC's default page loads vega, vega-lite and vega-embed from a CDN through its `{scripts}` placeholder. This
template has no `{scripts}`: it carries the one script that vl-convert-python (pinned in requirements.txt)
bundles, which defines `vegaEmbed`, the only global DVC's plot divs call. The repository's .dvc/config points
`plots.html_template` at it. A small script at the end marks each picture `data-loaded="yes"` once it has
loaded, which the browser test reads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

VEGA_LITE = "5.21"  # DVC's plot templates are Vega-Lite 5 specs

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- vega-embed with vega and vega-lite {vega_lite}, from vl-convert-python {version}
         (vl_convert.javascript_bundle): made by scripts/make_plots_template.py, not edited by hand -->
    <script>
{bundle}
    </script>
    <style>
        body {{ font-family: sans-serif; }}
        table {{ border-spacing: 15px; }}
        img {{ max-width: 560px; }}
    </style>
</head>
<body>
    {{plot_divs}}
    <script>
        window.addEventListener("load", function () {{
            document.querySelectorAll("img").forEach(function (img) {{
                img.setAttribute("data-loaded", img.complete && img.naturalWidth > 0 ? "yes" : "no");
            }});
        }});
    </script>
</body>
</html>
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".dvc/plots_template.html"))
    args = parser.parse_args()
    from importlib.metadata import version

    import vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE)
    for placeholder in ("{plot_divs}", "{scripts}", "{refresh_tag}", "</script"):
        if placeholder in bundle:
            raise SystemExit(f"the bundle contains {placeholder!r}; it cannot be inlined in DVC's template")
    page = PAGE.format(bundle=bundle, vega_lite=VEGA_LITE, version=version("vl-convert-python"))
    args.out.write_text(page, encoding="utf-8")
    print(f"wrote {args.out} ({len(page):,} characters)")


if __name__ == "__main__":
    main()
