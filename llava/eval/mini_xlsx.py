"""A minimal .xlsx writer and reader (one sheet of strings and numbers): enough for MMBench submissions without
openpyxl. The files open in Excel/LibreOffice and read with `pandas.read_excel`.
"""

from __future__ import annotations

import math
import re
import zipfile
from collections.abc import Sequence
from xml.etree import ElementTree
from xml.sax.saxutils import escape

_NS = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
_REL_NS = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
_PKG_NS = "http://schemas.openxmlformats.org/package/2006/relationships"
_XML_DECL = '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
_ILLEGAL_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")  # not allowed in XML 1.0 text

_CONTENT_TYPES = (
    f'{_XML_DECL}<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
    '<Default Extension="xml" ContentType="application/xml"/>'
    '<Override PartName="/xl/workbook.xml" '
    'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
    '<Override PartName="/xl/worksheets/sheet1.xml" '
    'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/>'
    '<Override PartName="/xl/styles.xml" '
    'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.styles+xml"/>'
    "</Types>"
)
_ROOT_RELS = (
    f'{_XML_DECL}<Relationships xmlns="{_PKG_NS}">'
    f'<Relationship Id="rId1" Type="{_REL_NS}/officeDocument" Target="xl/workbook.xml"/></Relationships>'
)
_WORKBOOK_RELS = (
    f'{_XML_DECL}<Relationships xmlns="{_PKG_NS}">'
    f'<Relationship Id="rId1" Type="{_REL_NS}/worksheet" Target="worksheets/sheet1.xml"/>'
    f'<Relationship Id="rId2" Type="{_REL_NS}/styles" Target="styles.xml"/></Relationships>'
)
_STYLES = (
    f'{_XML_DECL}<styleSheet xmlns="{_NS}">'
    '<fonts count="1"><font><sz val="11"/><name val="Calibri"/></font></fonts>'
    '<fills count="2"><fill><patternFill patternType="none"/></fill><fill><patternFill patternType="gray125"/></fill>'
    "</fills>"
    '<borders count="1"><border><left/><right/><top/><bottom/><diagonal/></border></borders>'
    '<cellStyleXfs count="1"><xf numFmtId="0" fontId="0" fillId="0" borderId="0"/></cellStyleXfs>'
    '<cellXfs count="1"><xf numFmtId="0" fontId="0" fillId="0" borderId="0" xfId="0"/></cellXfs>'
    '<cellStyles count="1"><cellStyle name="Normal" xfId="0" builtinId="0"/></cellStyles>'
    "</styleSheet>"
)


def column_letter(index: int) -> str:
    """0 -> A, 25 -> Z, 26 -> AA."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(65 + rest) + letters
    return letters


def _column_index(ref: str) -> int:
    letters = re.match(r"[A-Z]+", ref).group(0)
    index = 0
    for ch in letters:
        index = index * 26 + ord(ch) - 64
    return index - 1


def _cell(ref: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return f'<c r="{ref}" t="b"><v>{int(value)}</v></c>'
    if isinstance(value, (int, float)):
        return f'<c r="{ref}"><v>{value!r}</v></c>'
    text = escape(_ILLEGAL_XML.sub("", str(value)))
    return f'<c r="{ref}" t="inlineStr"><is><t xml:space="preserve">{text}</t></is></c>'


def write_xlsx(path: str, header: Sequence[str], rows: Sequence[Sequence], sheet_name: str = "Sheet1") -> None:
    """Write `header` and `rows` (str, int, float, bool or None cells) as the only sheet of a new workbook."""
    lines = []
    for r, values in enumerate([list(header), *map(list, rows)], 1):
        cells = "".join(_cell(f"{column_letter(c)}{r}", v) for c, v in enumerate(values))
        lines.append(f'<row r="{r}">{cells}</row>')
    sheet = f'{_XML_DECL}<worksheet xmlns="{_NS}"><sheetData>{"".join(lines)}</sheetData></worksheet>'
    workbook = (
        f'{_XML_DECL}<workbook xmlns="{_NS}" xmlns:r="{_REL_NS}"><sheets>'
        f'<sheet name="{escape(sheet_name)}" sheetId="1" r:id="rId1"/></sheets></workbook>'
    )
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("[Content_Types].xml", _CONTENT_TYPES)
        z.writestr("_rels/.rels", _ROOT_RELS)
        z.writestr("xl/workbook.xml", workbook)
        z.writestr("xl/_rels/workbook.xml.rels", _WORKBOOK_RELS)
        z.writestr("xl/styles.xml", _STYLES)
        z.writestr("xl/worksheets/sheet1.xml", sheet)


def read_xlsx(path: str) -> tuple[list[str], list[list]]:
    """(header, rows) of the first sheet: inline and shared strings, numbers (int when whole), booleans."""
    q = f"{{{_NS}}}"
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        shared = []
        if "xl/sharedStrings.xml" in names:
            root = ElementTree.fromstring(z.read("xl/sharedStrings.xml"))
            shared = ["".join(t.text or "" for t in si.iter(f"{q}t")) for si in root.iter(f"{q}si")]
        sheet = "xl/worksheets/sheet1.xml"
        root = ElementTree.fromstring(z.read(sheet))
    table = []
    for row in root.iter(f"{q}row"):
        values: dict[int, object] = {}
        for c in row.iter(f"{q}c"):
            kind, v = c.get("t"), c.find(f"{q}v")
            if kind == "inlineStr":
                value = "".join(t.text or "" for t in c.iter(f"{q}t"))
            elif v is None:
                value = None
            elif kind == "s":
                value = shared[int(v.text)]
            elif kind == "b":
                value = v.text == "1"
            elif kind in ("str", "e"):
                value = v.text
            else:
                number = float(v.text)
                value = int(number) if number.is_integer() and "." not in v.text and "E" not in v.text else number
            ref = c.get("r")  # optional in the format: without it, a cell follows the previous one
            values[_column_index(ref) if ref else (max(values) + 1 if values else 0)] = value
        width = max(values) + 1 if values else 0
        table.append([values.get(i) for i in range(width)])
    if not table:
        return [], []
    header, rows = table[0], table[1:]
    return header, [r + [None] * (len(header) - len(r)) for r in rows]
