"""mpqc inspect: the matmul and component table of a captured model."""

from __future__ import annotations

from mpqc.io import write_json_atomic

from . import common


def add_parser(sub) -> None:
    parser = sub.add_parser("inspect", help="print the matmuls and components of a model")
    common.add_model_args(parser)
    parser.add_argument("--granularity", default="matmul", choices=["matmul", "layer"])
    parser.set_defaults(func=run)


def run(args) -> int:
    _, _, graph = common.load_and_capture(args.model, 64, args.device, args.dtype)
    print(graph.summary())
    comps = graph.components(args.granularity)
    print(f"\n{len(comps)} components at {args.granularity} granularity; {graph.total_params:,} matmul parameters")
    if args.json:
        write_json_atomic(
            args.json,
            {
                **graph.to_dict(),
                "components": {
                    args.granularity: [
                        {
                            "name": c.name,
                            "layer": c.layer,
                            "params": c.params,
                            "macs": c.macs,
                            "matmuls": [m.name for m in c.matmuls],
                        }
                        for c in comps
                    ]
                },
            },
        )
    return 0
