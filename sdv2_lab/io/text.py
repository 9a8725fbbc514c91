"""Text files users write (prompt files, prompts lists): UTF-8, or any encoding a byte-order mark names (UTF-16
and UTF-32 as Windows editors save them, UTF-8 with a BOM). Anything else is refused by name, with the byte
and what to do, rather than guessed (Latin-1 would decode any bytes, wrongly)."""
from __future__ import annotations

import codecs
from pathlib import Path

BOMS = [(codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
        (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")]   # UTF-32 LE starts like UTF-16 LE


def read_text(path: str | Path, what: str = "file") -> str:
    """The text of ``path``; ``what`` names it in errors (``input.prompt_file``)."""
    path = Path(path)
    data = path.read_bytes()
    encoding = next((enc for bom, enc in BOMS if data.startswith(bom)), "utf-8")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        bad = data[exc.start:exc.start + 1]
        raise ValueError(f"{what} {path} is not {encoding.upper().replace('-SIG', '')} text (byte 0x{bad.hex()} "
                         f"at offset {exc.start}; Latin-1 or Windows-1252?): save it as UTF-8, or as UTF-16 with "
                         f"a byte-order mark") from None
