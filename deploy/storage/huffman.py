"""TFLM HUFFMAN storage: int8 weights as a canonical Huffman bitstream, decoded through lookup tables.

The format is what tensorflow/lite/micro/kernels/decode_state_huffman.cc reads (the "Xtensa format"):

- encoded tensor: the codewords of all elements in C order as one bit string, most significant bit
  first. The decoder loads it as 32-bit words and byte-swaps them on little-endian hosts, so in memory it
  is a plain MSB-first byte stream, padded to whole words (and one more word when the decoder's
  look-ahead would read past the last one).
- ancillary tensor: the 16-byte DECODE Common Metadata (type 1, DCM version 1; byte 4 = HUFFMAN version
  1; byte 5 = ``(root_bits - 1) << 4``, bit 0 clear for 16-bit entries), then the decode tables as
  little-endian 16-bit entries. (Bit 0 set selects 32-bit entries, which int16 tensors need; int8 never
  does: a table tree over at most 256 values has at most 2 * 255 entries, so every offset fits 11 bits.)
- a table of ``2**b`` entries is indexed by the next b bits of the stream. A symbol entry has bit 15 set,
  the number of those b bits its codeword uses in bits 14-11, and the int8 value in bits 7-0; the decoder
  puts the unused bits back. A link entry has bit 15 clear, ``b' - 1`` in bits 14-11 (the next table's
  index width) and, in bits 10-0, the next table's position *relative to the link entry itself*. The
  root table starts the tables and its width is in DCM byte 5.

Tables nest to any depth, so codeword length is not limited by the format; it is limited here to
``MAX_CODE_BITS`` with package-merge (optimal among length-limited codes). The table shape is chosen by
dynamic programming over the code tree: fewest entries (flash), then fewest lookups per weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tflite_micro.tensorflow.lite.micro.compression import compressor, decode, model_editor, spec

from deploy.flatbuffer import INT8
from deploy.storage.base import Storage, StorageError, StorageKind
from deploy.storage.encode import encode_model, storage_of

HUFFMAN_VERSION = 1  # decode_state_huffman.cc refuses any other value in DCM byte 4
MAX_CODE_BITS = 16  # longest codeword; bounds the lookups a rare value costs (the format has no limit)
# decode_state_huffman.h: the 4-bit count field holds a symbol's bits in its table (so tables are at most
# 15 bits wide), and DCM byte 5 holds the root width minus one in 4 bits.
_MAX_TABLE_BITS = 15
# kTable16BitSymbolFoundMask, kTable16BitCountShift, kTable16BitValueMask
_SYMBOL_FOUND, _COUNT_SHIFT, _VALUE_MASK = 0x8000, 11, 0x07FF
_WORD_BITS = 32  # the decoder reads the stream in 32-bit words


def code_lengths(counts: np.ndarray, limit: int = MAX_CODE_BITS) -> np.ndarray:
    """Optimal prefix-code lengths of at most limit bits per count (package-merge); 0 where count is 0."""
    counts = np.asarray(counts, dtype=np.int64)
    used = np.flatnonzero(counts)
    lengths = np.zeros(counts.size, dtype=np.int64)
    if used.size == 1:
        lengths[used] = 1  # a lone symbol still needs a 1-bit codeword to be read
        return lengths
    if used.size > 2**limit:
        raise StorageError(f"{used.size} symbols cannot have codes of at most {limit} bits")
    order = used[np.argsort(counts[used], kind="stable")]
    leaf_w, leaf_m = counts[order], np.eye(order.size, dtype=np.int64)
    w, m = leaf_w, leaf_m
    for _ in range(limit - 1):
        pairs = w.size // 2 * 2
        w = np.concatenate([leaf_w, w[0:pairs:2] + w[1:pairs:2]])
        m = np.concatenate([leaf_m, m[0:pairs:2] + m[1:pairs:2]])
        keep = np.argsort(w, kind="stable")
        w, m = w[keep], m[keep]
    lengths[order] = m[: 2 * order.size - 2].sum(axis=0)
    return lengths


@dataclass(frozen=True)
class HuffmanCode:
    """A canonical code over byte values 0..255 (an int8 value v is byte ``v & 0xFF``)."""

    lengths: tuple[int, ...]  # bits per byte value, 0 when absent
    codes: tuple[int, ...]

    @classmethod
    def from_counts(cls, counts: np.ndarray, limit: int = MAX_CODE_BITS) -> HuffmanCode:
        """The canonical code (shorter codes first, ties by byte value) with optimal limited lengths."""
        lengths = code_lengths(counts, limit)
        codes = np.zeros(lengths.size, dtype=np.int64)
        code, prev = 0, 0
        for sym in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
            code <<= int(lengths[sym]) - prev
            codes[sym], prev = code, int(lengths[sym])
            code += 1
        return cls(tuple(int(v) for v in lengths), tuple(int(v) for v in codes))


@dataclass(frozen=True)
class HuffmanTables:
    """The decode tables of a code, laid out depth first as the runtime walks them."""

    root_bits: int
    entries: tuple[int, ...]  # 16-bit entries, root table first
    overread: tuple[int, ...]  # per byte value: look-ahead bits its last table reads past its codeword

    def user_data(self) -> bytes:
        """DCM bytes 4-5: HUFFMAN version, then the root width (and 16-bit entries)."""
        return bytes([HUFFMAN_VERSION, (self.root_bits - 1) << 4])

    def to_bytes(self) -> bytes:
        """The tables as the ancillary tensor carries them after the DCM."""
        return np.asarray(self.entries, dtype="<u2").tobytes()


class _TableTree:
    """The cheapest table tree for a code: fewest entries, then fewest lookups weighted by value counts."""

    def __init__(self, code: HuffmanCode, counts: np.ndarray) -> None:
        self.symbols = np.flatnonzero(np.asarray(code.lengths))
        self.lengths = np.asarray(code.lengths, dtype=np.int64)[self.symbols]
        self.codes = np.asarray(code.codes, dtype=np.int64)[self.symbols]
        self.counts = np.asarray(counts, dtype=np.int64)[self.symbols]
        self._memo: dict[tuple[int, int], tuple[tuple[int, int], int]] = {}

    def below(self, prefix: int, depth: int) -> np.ndarray:
        """Positions (into self.symbols) of the codes that extend a prefix of depth bits."""
        longer = self.lengths > depth
        return np.flatnonzero(longer & ((self.codes >> np.where(longer, self.lengths - depth, 0)) == prefix))

    def children(self, prefix: int, depth: int, bits: int) -> list[int]:
        """Prefixes (depth + bits long) of the codes a bits-wide table at (prefix, depth) leaves open."""
        idx = self.below(prefix, depth)
        idx = idx[self.lengths[idx] > depth + bits]
        return [int(p) for p in np.unique(self.codes[idx] >> (self.lengths[idx] - depth - bits))]

    def best(self, prefix: int, depth: int) -> tuple[tuple[int, int], int]:
        """((entries, lookups), width) of the cheapest tree of tables below (prefix, depth)."""
        key = (prefix, depth)
        if key not in self._memo:
            idx = self.below(prefix, depth)
            reach = int(self.lengths[idx].max()) - depth
            options = []
            for bits in range(1, min(_MAX_TABLE_BITS, reach) + 1):
                entries, lookups = 2**bits, int(self.counts[idx].sum())
                for child in self.children(prefix, depth, bits):
                    (e, n), _ = self.best(child, depth + bits)
                    entries, lookups = entries + e, lookups + n
                options.append(((entries, lookups), bits))
            self._memo[key] = min(options)
        return self._memo[key]


def build_tables(code: HuffmanCode, counts: np.ndarray) -> HuffmanTables:
    """The decode tables for code: the root first, each table's subtables after it, depth first."""
    tree = _TableTree(code, counts)
    layout: dict[tuple[int, int], tuple[int, int]] = {}  # (prefix, depth) -> (width, first entry)

    def place(prefix: int, depth: int, start: int) -> int:
        bits = tree.best(prefix, depth)[1]
        layout[(prefix, depth)] = (bits, start)
        end = start + 2**bits
        for child in tree.children(prefix, depth, bits):
            end = place(child, depth + bits, end)
        return end

    entries: list[tuple[str, int, int]] = [("", 0, 0)] * place(0, 0, 0)  # (kind, width or used bits, value)
    overread = [0] * len(code.lengths)
    for (prefix, depth), (bits, start) in layout.items():
        for i in tree.below(prefix, depth):
            rest, sym = int(tree.lengths[i]) - depth, int(tree.symbols[i])
            if rest <= bits:  # resolved here: every index that starts with the codeword's remaining bits
                first = start + ((int(tree.codes[i]) & ((1 << rest) - 1)) << (bits - rest))
                entries[first : first + 2 ** (bits - rest)] = [("sym", rest, sym)] * 2 ** (bits - rest)
                overread[sym] = bits - rest
        for child in tree.children(prefix, depth, bits):
            pos = start + (child & ((1 << bits) - 1))
            entries[pos] = ("link", layout[(child, depth + bits)][0], layout[(child, depth + bits)][1] - pos)
    # A one-value code is the only incomplete one: its unreachable entry repeats the value.
    entries = [e if e[0] else next(x for x in entries if x[0] == "sym") for e in entries]
    if max((v for kind, _, v in entries if kind == "link"), default=0) > _VALUE_MASK:
        raise StorageError(f"a {len(entries)}-entry table tree has offsets past 16-bit entries")  # see above
    words = tuple(
        _SYMBOL_FOUND | used << _COUNT_SHIFT | value if kind == "sym" else (used - 1) << _COUNT_SHIFT | value
        for kind, used, value in entries
    )
    return HuffmanTables(layout[(0, 0)][0], words, tuple(overread))


@dataclass(frozen=True)
class HuffmanArray:
    """A tensor as HUFFMAN stores it: the padded bitstream and the ancillary tensor (DCM + tables)."""

    encoded_data: bytes
    ancillary_data: bytes

    @property
    def size(self) -> int:
        """Payload bytes: bitstream plus ancillary tensor (flatbuffer bookkeeping not included)."""
        return len(self.encoded_data) + len(self.ancillary_data)


def _symbols(values: np.ndarray) -> np.ndarray:
    """An int8 array's elements in C order as byte values 0..255."""
    values = np.asarray(values)
    if values.dtype != np.int8 or not values.size:
        raise StorageError(
            f"HUFFMAN here encodes non-empty int8 arrays, got {values.dtype} of shape {values.shape}"
        )
    return values.reshape(-1).view(np.uint8)


def _code_and_tables(symbols: np.ndarray) -> tuple[HuffmanCode, HuffmanTables]:
    counts = np.bincount(symbols, minlength=256)
    code = HuffmanCode.from_counts(counts)
    return code, build_tables(code, counts)


def _stream_words(symbols: np.ndarray, code: HuffmanCode, tables: HuffmanTables) -> tuple[np.ndarray, int]:
    """Codeword lengths per element and the 32-bit words the decoder will read."""
    lengths = np.asarray(code.lengths, dtype=np.int64)[symbols]
    # The last table of each codeword reads its full width; the runtime must find those bits in the buffer.
    reach = int(np.max(np.cumsum(lengths) + np.asarray(tables.overread, dtype=np.int64)[symbols]))
    return lengths, -(-reach // _WORD_BITS)


def huffman_array(values: np.ndarray) -> HuffmanArray:
    """HUFFMAN encoding of an int8 array: one canonical code and decode table for the whole array."""
    symbols = _symbols(values)
    code, tables = _code_and_tables(symbols)
    lengths, words = _stream_words(symbols, code, tables)
    codes = np.asarray(code.codes, dtype=np.int64)[symbols]
    # Bit j of the stream is bit (length - 1 - offset) of the codeword it falls in.
    owner = np.repeat(np.arange(symbols.size), lengths)
    offset = np.arange(owner.size) - (np.cumsum(lengths) - lengths)[owner]
    bits = (codes[owner] >> (lengths[owner] - 1 - offset)) & 1
    stream = np.zeros(words * _WORD_BITS, dtype=np.uint8)
    stream[: bits.size] = bits
    dcm = decode.DecodeCommonMetadata(decode_type=decode.DecodeType.HUFFMAN, user_data=tables.user_data())
    return HuffmanArray(np.packbits(stream, bitorder="big").tobytes(), dcm.to_bytes() + tables.to_bytes())


def encoded_size(values: np.ndarray) -> int:
    """HUFFMAN payload bytes of an int8 array (bitstream + DCM + tables), without writing the bitstream."""
    return sum(encoded_parts(values))


def encoded_parts(values: np.ndarray) -> tuple[int, int]:
    """(bitstream bytes, ancillary bytes: DCM + tables) of an int8 array's HUFFMAN encoding."""
    symbols = _symbols(values)
    code, tables = _code_and_tables(symbols)
    _, words = _stream_words(symbols, code, tables)
    return words * (_WORD_BITS // 8), decode.DecodeCommonMetadata.SIZE + 2 * len(tables.entries)


class HuffmanCompressor(compressor.Compressor):
    """tflite_micro compression plugin for HUFFMAN (its own huffman.py is a stub that raises)."""

    @property
    def decode_type(self) -> decode.DecodeType:
        """DecodeType.HUFFMAN (1)."""
        return decode.DecodeType.HUFFMAN

    def compress(
        self, tensor: model_editor.Tensor, method: spec.CompressionMethod
    ) -> compressor.CompressionResult:
        """The bitstream as the encoded tensor, DCM + tables as the ancillary tensor."""
        if not isinstance(method, spec.HuffmanCompression):
            raise compressor.CompressionError(
                f"HuffmanCompressor takes HuffmanCompression, got {type(method)}"
            )
        if tensor.dtype != INT8 or tensor.array is None:
            raise compressor.CompressionError("HUFFMAN here encodes constant INT8 tensors only")
        # Quantization plays no part: the decoder reproduces the stored bytes, whatever their scales.
        enc = huffman_array(tensor.array)
        return compressor.CompressionResult(encoded_data=enc.encoded_data, ancillary_data=enc.ancillary_data)


def compress(model_bytes: bytes, tensors: list[tuple[int, int]] | None = None) -> bytes:
    """The int8 model with its weights (default: every conv/dense weight) HUFFMAN-encoded where that pays."""
    return encode_model(model_bytes, HuffmanCompressor(), spec.HuffmanCompression(), tensors)


def build(converted: bytes) -> Storage:
    """HUFFMAN storage of a converted model (INT4 widened to int8 first)."""
    return storage_of("huffman", converted, compress)


KIND = StorageKind(
    "huffman",
    build,
    "a canonical Huffman code per tensor, table-driven; DECODE restores int8",
    decoder="HUFFMAN",
    # In --storage auto only when the run prunes (--prune): on dense weights it rarely beats LUT, and each
    # Invoke pays its decode time (HUFFMAN: 2x the digits model's host latency).
    in_auto=False,
    sparse=True,
)
