"""Screenshot of the web UI answering questions about an image, taken in headless Chromium (docs/images).

    python -m llava.demo.screenshot --url http://127.0.0.1:7860 \
        --image playground/data/demo/images/eval/000000.png \
        --question "What color is the shape?" --question "How many shapes are there?" \
        --out docs/images/demo_web_ui.png

Needs Playwright (`pip install 'llava[test]'`) and a Chromium binary (`apt-get install chromium`); no browser
download.
"""

from __future__ import annotations

import argparse
import os

BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def take(
    url: str,
    image: str,
    questions: list[str],
    out: str,
    chromium: str = "/usr/bin/chromium",
    width: int = 1280,
    height: int = 900,
    timeout_s: float = 120,
) -> list[str]:
    """Upload `image`, ask `questions` one after another, save a screenshot at `out`; returns the chat's text."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as err:
        raise ImportError("The screenshot needs Playwright: pip install 'llava[test]'.") from err
    if not os.path.exists(chromium):
        raise FileNotFoundError(
            f"No Chromium at `{chromium}`; install it (apt-get install chromium) or pass --chromium."
        )
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url)
            page.wait_for_selector("#textbox textarea", timeout=timeout_s * 1000)
            page.set_input_files("#imagebox input[type=file]", image)
            page.wait_for_selector("#imagebox img", timeout=timeout_s * 1000)
            for question in questions:
                page.fill("#textbox textarea", question)
                page.click("#send_btn")
                page.wait_for_selector("#upvote_btn[disabled]", timeout=timeout_s * 1000)
                page.wait_for_selector("#upvote_btn:not([disabled])", timeout=timeout_s * 1000)
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            page.screenshot(path=out, full_page=True)
            texts = page.locator("#chatbot .message").all_inner_texts()
            # a message's text shows up once per nested `.message` element: keep one of each run
            return [t for i, t in enumerate(texts) if i == 0 or t != texts[i - 1]]
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860")
    parser.add_argument("--image", required=True)
    parser.add_argument("--question", action="append", required=True, help="repeat to ask several in turn")
    parser.add_argument("--out", default="docs/images/demo_web_ui.png")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args(argv)
    chat = take(args.url, args.image, args.question, args.out, args.chromium)
    print("\n".join(chat))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
