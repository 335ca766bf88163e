"""Sphinx configuration: the Markdown pages of docs/ (MyST) with the furo theme.

pip install -r requirements-docs.txt
python -m sphinx -W -b html docs docs/_build/html     # warnings are errors, as in CI
"""

project = "imgclf"
author = "the imgclf developers"
extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
master_doc = "index"
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = "imgclf"
# `page.md#a-heading` links, with GitHub's anchors, so that the pages read the same on GitHub and on the site.
myst_heading_anchors = 4
myst_enable_extensions = ["colon_fence"]
