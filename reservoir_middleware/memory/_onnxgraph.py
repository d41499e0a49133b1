"""Look up the built-in model's word embeddings in its int8 table, not in a float32 copy.

The int8 model stores each weight as int8 plus a scale, dequantized in the
graph (`Cast`, `Mul`). onnxruntime folds those constants when it loads the
model, so the word-embedding table (30,522 x 384) lives as 47 MB of float32
of which a request reads a few rows. Rewritten as Gather(int8 table, ids) ->
Cast -> Mul(Gather(scales, ids)), the table stays at 12 MB and the rows
looked up are dequantized by the same float operations, so the outputs are
bit for bit those of the original graph. Saves ~35 MB in each process that
embeds (the gateway and its Chroma child) and ~65 MB of peak at load time.

The model file is edited in memory at the protobuf wire level (ModelProto
field 7 = graph; GraphProto field 1 = node; NodeProto fields 1 = input,
2 = output, 3 = name, 4 = op_type), so no `onnx` package is needed.
"""

from __future__ import annotations

MODEL_GRAPH, GRAPH_NODE = 7, 1
NODE_INPUT, NODE_OUTPUT, NODE_NAME, NODE_OP = 1, 2, 3, 4

Field = tuple[int, int, bytes]  # number, wire type, raw value (length-delimited: the payload)


class NotRewritable(ValueError):
    """The graph does not have the expected dequantize-then-gather shape."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise NotRewritable("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def parse(data: bytes) -> list[Field]:
    """The top-level fields of a protobuf message, in order, values undecoded."""
    fields: list[Field] = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            end = _varint(data, pos)[1]
        elif wire == 1:
            end = pos + 8
        elif wire == 5:
            end = pos + 4
        elif wire == 2:
            size, pos = _varint(data, pos)
            end = pos + size
        else:
            raise NotRewritable(f"protobuf wire type {wire} is not expected in a model")
        if end > len(data):
            raise NotRewritable("truncated protobuf field")
        fields.append((number, wire, data[pos:end]))
        pos = end
    return fields


def serialize(fields: list[Field]) -> bytes:
    parts = []
    for number, wire, raw in fields:
        parts.append(_encode_varint(number << 3 | wire))
        if wire == 2:
            parts.append(_encode_varint(len(raw)))
        parts.append(raw)
    return b"".join(parts)


def _strings(node: list[Field], number: int) -> list[str]:
    return [raw.decode() for field, wire, raw in node if field == number and wire == 2]


def _renamed(node: list[Field], inputs: list[str], outputs: list[str], name: str) -> bytes:
    kept = [f for f in node if f[0] not in (NODE_INPUT, NODE_OUTPUT, NODE_NAME)]
    new = [(NODE_INPUT, 2, s.encode()) for s in inputs]
    new += [(NODE_OUTPUT, 2, s.encode()) for s in outputs]
    return serialize([*new, (NODE_NAME, 2, name.encode()), *kept])


def gather_quantized(model: bytes, table: str) -> bytes:
    """The model with `table` (an int8 initializer `<table>_q` dequantized by
    Cast and Mul with a per-row scale, read only by one Gather) gathered before
    it is dequantized. Raises NotRewritable if the graph is not of that shape."""
    top = parse(model)
    at = [i for i, (number, wire, _) in enumerate(top) if number == MODEL_GRAPH and wire == 2]
    if len(at) != 1:
        raise NotRewritable("no single graph in the model")
    graph = parse(top[at[0]][2])
    nodes = {i: parse(raw) for i, (number, wire, raw) in enumerate(graph) if number == GRAPH_NODE}

    def only(op: str, reads: str) -> int:
        found = [i for i, n in nodes.items() if reads in _strings(n, NODE_INPUT)]
        if len(found) != 1 or _strings(nodes[found[0]], NODE_OP) != [op]:
            raise NotRewritable(f"{reads} is not read by exactly one {op}")
        return found[0]

    cast = only("Cast", f"{table}_q")
    cast_out = _strings(nodes[cast], NODE_OUTPUT)
    if len(cast_out) != 1:
        raise NotRewritable(f"{table}_q is not cast once")
    mul = only("Mul", cast_out[0])
    mul_in, mul_out = _strings(nodes[mul], NODE_INPUT), _strings(nodes[mul], NODE_OUTPUT)
    if mul_in[:1] != cast_out or len(mul_in) != 2 or len(mul_out) != 1:
        raise NotRewritable(f"{table} is not dequantized as Mul(Cast(q), scale)")
    gather = only("Gather", mul_out[0])
    gather_in = _strings(nodes[gather], NODE_INPUT)
    gather_out = _strings(nodes[gather], NODE_OUTPUT)
    if gather_in[:1] != mul_out or len(gather_in) != 2 or len(gather_out) != 1:
        raise NotRewritable(f"{table} is not looked up as Gather(table, ids)")
    ids, scale, rows = gather_in[1], mul_in[1], gather_out[0]
    replacement = [
        _renamed(nodes[gather], [f"{table}_q", ids], [f"{rows}_q"], f"{rows}_gather_q"),
        _renamed(nodes[gather], [scale, ids], [f"{rows}_scale"], f"{rows}_gather_scale"),
        _renamed(nodes[cast], [f"{rows}_q"], [f"{rows}_f"], f"{rows}_cast"),
        _renamed(nodes[mul], [f"{rows}_f", f"{rows}_scale"], [rows], f"{rows}_dequantize"),
    ]
    edited: list[Field] = []
    for index, field in enumerate(graph):
        if index == gather:  # the new nodes where the lookup was: still in topological order
            edited += [(GRAPH_NODE, 2, node) for node in replacement]
        elif index not in (cast, mul):
            edited.append(field)
    top[at[0]] = (MODEL_GRAPH, 2, serialize(edited))
    return serialize(top)
