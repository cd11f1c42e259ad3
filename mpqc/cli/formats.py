"""mpqc formats: the number formats and their bits per element."""

from __future__ import annotations

from mpqc.io import write_json_atomic


def add_parser(sub) -> None:
    parser = sub.add_parser("formats", help="list the number formats")
    parser.add_argument("--json", help="also write the table here")
    parser.set_defaults(func=run)


def format_rows() -> list[dict]:
    from mpqc.formats import FORMATS

    rows = []
    for f in FORMATS.values():
        e = f.element
        rows.append(
            {
                "name": f.name,
                "family": f.family,
                "element": "cast to " + f.cast_dtype if e is None else e.name,
                "element_bits": f.element_bits,
                "max_normal": None if e is None else e.max_normal,
                "scale": f.scale.name,
                "block": f.block_size,
                "bits_per_element": f.bits_per_element,
            }
        )
    return rows


def run(args) -> int:
    rows = format_rows()
    print(f"{'format':<12} {'family':<7} {'element':<18} {'max':>9} {'scale':<6} {'block':<7} {'bits/elem':>9}")
    for r in rows:
        mx = "-" if r["max_normal"] is None else f"{r['max_normal']:g}"
        print(
            f"{r['name']:<12} {r['family']:<7} {r['element']:<18} {mx:>9} {r['scale']:<6} {str(r['block'] or '-'):<7} "
            f"{r['bits_per_element']:>9.3f}"
        )
    if args.json:
        write_json_atomic(args.json, rows)
    return 0
