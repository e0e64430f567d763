"""Zeroes, in the .nv_fatbin section of a CUDA library (an ELF shared object), the payloads of
every cubin other than sm_KEEP, in each fatbin that holds a sm_KEEP cubin: headers and offsets
stay as they are, the driver picks sm_KEEP as before, and the zeros compress to nothing.
Fatbins without a sm_KEEP cubin are left whole. Rewrites the file in place. Used by
scripts/gpu-bench.sh bundle.

    python3 scripts/py/prune-fatbins.py LIBRARY KEEP      (KEEP: e.g. 90 for sm_90)
"""

import struct
import sys

path, keep = sys.argv[1], int(sys.argv[2])
data = bytearray(open(path, "rb").read())
shoff, = struct.unpack_from("<Q", data, 0x28)
shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
def section(i):
    name, _, _, _, off, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
    return name, off, size
_, stroff, _ = section(shstrndx)
def name_of(n):
    return bytes(data[stroff + n:data.index(b"\0", stroff + n)]).decode()
fatbin = [section(i) for i in range(shnum) if name_of(section(i)[0]) == ".nv_fatbin"]
if not fatbin:
    sys.exit(f"{path}: no .nv_fatbin section")
_, pos, size = fatbin[0]
end, kept, zeroed = pos + size, 0, 0
while pos + 16 <= end:
    magic, _, header, fat = struct.unpack_from("<IHHQ", data, pos)
    if magic != 0xBA55ED50:  # alignment padding between fatbins
        pos += 8
        continue
    entries, e = [], pos + header
    while e < pos + header + fat:
        _, _, entry_header, payload = struct.unpack_from("<HHIQ", data, e)
        arch, = struct.unpack_from("<I", data, e + 28)
        entries.append((arch, e + entry_header, payload))
        e += entry_header + payload
    if any(arch == keep for arch, _, _ in entries):
        for arch, start, n in entries:
            if arch == keep:
                kept += n
            else:
                data[start:start + n] = bytes(n)
                zeroed += n
    pos += header + fat
open(path, "wb").write(data)
print(f"  {path}: kept {kept / 1e6:.0f} MB of sm_{keep} kernels, zeroed {zeroed / 1e6:.0f} MB of others")
