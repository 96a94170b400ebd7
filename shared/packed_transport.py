"""All of a message's arrays as one array on the wire.

Flower 1.42 moves a message as a tree of objects, one per array (and one per 5 MB chunk of a
larger array), and every hop (ServerApp -> SuperLink -> SuperNode -> ClientApp, and back)
fetches each object with its own request; a fetch of an object that has not arrived yet backs
off. ResNet-18 is ~100 arrays, so a 45 MB model was ~70-200 objects and ~4 x that many
requests per message, and the per-request cost, not the bytes, set the deployment's round
time (docs/speed.md, "Deployment overhead": 256 KB chunks, i.e. +160 objects, added ~8 s to a
clinic's wait for its message). Packing concatenates the raw bytes of every array of every
ArrayRecord into one Array (Flower chunks it: ~9 objects for 45 MB) and lists the records,
names, dtypes, shapes and serialisations in one ConfigRecord. Unpacking restores the records
bit for bit, in order. Nothing new leaves the clinic: the same bytes and the same array names
and shapes as without packing.

The server packs what it sends (server/federation.py, `federation.pack_arrays`); a clinic
packs its reply only when the message it answers came packed (client/transport.py), so either
side works with a peer that does not pack.
"""

from __future__ import annotations

import json

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

PACKED_RECORD = "dentfed.packed-arrays"
LAYOUT_RECORD = "dentfed.packed-layout"
PACKED_STYPE = "dentfed.concatenated-arrays"

PackCache = dict[tuple[tuple[str, int], ...], tuple[ArrayRecord, ConfigRecord]]


def is_packed(content: RecordDict) -> bool:
    return PACKED_RECORD in content.array_records


def pack_arrays(content: RecordDict, cache: PackCache | None = None) -> None:
    """Replace every ArrayRecord in `content` by one packed record plus its layout, in place
    (a sender's own message: `packed_copy`). `cache` shares one packed copy between messages
    that carry the same ArrayRecord objects (a round's train messages)."""
    records = dict(content.array_records)
    if not records:
        return
    key = tuple((name, id(rec)) for name, rec in records.items())
    if cache is not None and key in cache:
        packed, layout = cache[key]
    else:
        entries, parts = [], []
        for name, rec in records.items():
            arrays = []
            for k, a in rec.items():
                arrays.append([k, a.dtype, list(a.shape), a.stype, len(a.data)])
                parts.append(a.data)
            entries.append([name, arrays])
        data = b"".join(parts)
        packed = ArrayRecord({"data": Array(dtype="uint8", shape=(len(data),),
                                            stype=PACKED_STYPE, data=data)})
        layout = ConfigRecord({"layout": json.dumps(entries)})
        if cache is not None:
            cache[key] = (packed, layout)
    for name in records:
        del content[name]
    content[PACKED_RECORD] = packed
    content[LAYOUT_RECORD] = layout


def packed_copy(content: RecordDict, cache: PackCache | None = None) -> RecordDict:
    """A new RecordDict holding `content`'s records with its arrays packed; `content` is left
    as is. A sender packs a copy, not its own message: a Grid may keep the pushed object
    itself (Flower's in-memory simulation Grid does, and its engine thread reads it later),
    so a message must not change after it is pushed."""
    packed = RecordDict(dict(content.items()))
    pack_arrays(packed, cache)
    return packed


def unpack_arrays(content: RecordDict) -> bool:
    """Rebuild the ArrayRecords of a packed `content` in place; False if it was not packed.
    Raises ValueError when the layout does not describe the packed bytes exactly."""
    if not is_packed(content):
        return False
    try:
        blob = content.array_records[PACKED_RECORD]["data"]
        layout = json.loads(str(content.config_records[LAYOUT_RECORD]["layout"]))
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"packed arrays without a readable layout ({type(e).__name__})"
                         ) from None
    if blob.stype != PACKED_STYPE:
        raise ValueError(f"packed arrays of serialisation {blob.stype!r}")
    view, offset, rebuilt = memoryview(blob.data), 0, {}
    try:
        for name, arrays in layout:
            rec = {}
            for k, dtype, shape, stype, n in arrays:
                if n < 0 or offset + n > len(view):
                    raise ValueError("the layout runs past the packed bytes")
                rec[str(k)] = Array(dtype=str(dtype), shape=tuple(int(s) for s in shape),
                                    stype=str(stype), data=bytes(view[offset:offset + n]))
                offset += n
            rebuilt[str(name)] = ArrayRecord(rec)
    except (TypeError, ValueError) as e:
        raise ValueError(f"packed arrays do not match their layout: {e}") from None
    if offset != len(view):
        raise ValueError(f"{len(view) - offset} packed bytes not in the layout")
    del content[PACKED_RECORD]
    del content[LAYOUT_RECORD]
    for name, rec in rebuilt.items():
        content[name] = rec
    return True
