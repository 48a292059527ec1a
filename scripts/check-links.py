#!/usr/bin/env python3
"""Fail on a broken link in the rendered docs site: every relative href or
src of every page must name a file of the site, and every #fragment an id on
that page. Links to other sites are not fetched (CI has no network).

    scripts/check-links.py docs/book
"""

from __future__ import annotations

import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "a" and a.get("name"):
            self.ids.add(a["name"])
        for k in ("href", "src"):
            if a.get(k) and not (tag == "link" and k == "href" and a.get("rel") == "canonical"):
                self.links.append(a[k])


def main() -> int:
    site = Path(sys.argv[1]).resolve()
    pages: dict[Path, Page] = {}
    for f in site.rglob("*.html"):
        p = Page()
        p.feed(f.read_text(errors="replace"))
        pages[f] = p
    if not pages:
        print(f"no HTML under {site}", file=sys.stderr)
        return 1
    bad = []
    for f, p in pages.items():
        # print.html and toc.html repeat every page; the pages themselves are checked
        if f.name in ("print.html", "toc.html", "404.html"):
            continue
        for link in p.links:
            u = urlsplit(link)
            if u.scheme or link.startswith("//") or link.startswith("mailto:"):
                continue
            target = (f.parent / unquote(u.path)).resolve() if u.path else f
            if u.path and not str(target).startswith(str(site)):
                bad.append(f"{f.relative_to(site)}: {link} leaves the site")
                continue
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                bad.append(f"{f.relative_to(site)}: {link} -> no such file")
                continue
            if u.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else set()
                if unquote(u.fragment) not in ids:
                    bad.append(f"{f.relative_to(site)}: {link} -> no #{u.fragment} on that page")
    for b in bad:
        print(f"broken link: {b}", file=sys.stderr)
    print(f"checked {sum(len(p.links) for p in pages.values())} links on {len(pages)} pages: "
          f"{len(bad)} broken", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
