"""The GPU architectures inside a shared library's CUDA fatbinary, read without CUDA or NVIDIA's tools.

``fatbin_architectures(path)`` walks the ELF ``.nv_fatbin`` section of a library (attnseg._C) and
lists the SASS and PTX it carries; :mod:`attnseg._ops` uses it to say whether the CUDA kernels
can run on a given GPU.
"""

from __future__ import annotations

import struct

__all__ = ["fatbin_architectures"]

_FATBIN_MAGIC = 0xBA55ED50


def _elf_section(data: bytes, wanted: str) -> tuple[int, int] | None:
    """(offset, size) of the ELF64 little-endian section named ``wanted``, or None."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_offset = headers[shstrndx][4]
    for name_offset, _, _, _, offset, size, *_ in headers:
        start = names_offset + name_offset
        if data[start:data.index(b"\0", start)].decode(errors="replace") == wanted:
            return offset, size
    return None


def fatbin_architectures(path: str) -> dict[str, list[str]] | None:
    """{"sass": ["sm_80", ...], "ptx": ["compute_90", ...]} embedded in the shared library ``path``
    (None when it has no ``.nv_fatbin`` section to read, e.g. not an ELF library).

    Walks the ``.nv_fatbin`` section: fatbinary headers (magic 0xBA55ED50, header size, size)
    holding entries (kind 1 = PTX, 2 = ELF/SASS; the architecture at byte 28 of each entry
    header), the layout ``cuobjdump --list-elf/--list-ptx`` reports (checked in tests).
    """
    with open(path, "rb") as f:
        data = f.read()
    sass, ptx = set(), set()
    section = _elf_section(data, ".nv_fatbin")
    if section is None:
        return None
    pos, end = section[0], min(section[0] + section[1], len(data))
    while pos + 16 <= end:
        magic, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, pos)
        if magic != _FATBIN_MAGIC or header_size == 0:
            pos += 8  # blobs are 8-byte aligned
            continue
        entry, blob_end = pos + header_size, min(pos + header_size + fat_size, end)
        while entry + 32 <= blob_end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            if kind == 0 or entry_header + payload == 0:  # padding or a damaged entry: stop here
                break
            arch = struct.unpack_from("<I", data, entry + 28)[0]
            if kind == 1:
                ptx.add(arch)
            elif kind == 2:  # other kinds (LTO IR) are neither
                sass.add(arch)
            entry += entry_header + payload
        pos = max(blob_end, pos + 8)
    return {"sass": [f"sm_{a}" for a in sorted(sass)], "ptx": [f"compute_{a}" for a in sorted(ptx)]}
