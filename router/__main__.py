"""`python -m router --model DIR --prefill ADDR --decode ADDR | --colocated ADDR ...`"""

from __future__ import annotations

import asyncio
import logging

from router.config import parse_args
from router.server import run


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the router until SIGTERM."""
    config = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(run(config))


if __name__ == "__main__":
    main()
