"""mpqc export: ONNX with low-bit weights, mpqc activation functions and precision metadata."""

from __future__ import annotations

import json

from mpqc.io import write_json_atomic

from . import common


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "export", help="export to ONNX: low-bit weights, mpqc activation functions, precision metadata"
    )
    common.add_model_args(parser)
    common.add_plan_args(parser)
    parser.add_argument("-o", "--output", default="model.onnx", help="the ONNX file to write (default model.onnx)")
    parser.add_argument(
        "--gguf",
        default=None,
        metavar="OUT.gguf",
        help="write a GGUF file for llama.cpp instead of ONNX: every matmul weight in its plan's type, the rest "
        "(metadata, tokenizer, other tensors) as the source GGUF has it",
    )
    parser.add_argument(
        "--llama-quantize-args",
        action="store_true",
        help="print the llama-quantize --tensor-type arguments that choose the plan's types on your own f16 GGUF",
    )
    parser.add_argument(
        "--fp-weights",
        default="table",
        choices=["table", "standard"],
        help="float-element weights as uint8 codes + lookup table (runs in ONNX Runtime) or as "
        "standard FLOAT4E2M1/FLOAT8 DequantizeLinear (opset 25)",
    )
    parser.add_argument("--opset", type=int, default=None, help="default 21 (25 with --fp-weights standard)")
    parser.add_argument(
        "--external-data",
        default="auto",
        choices=["auto", "yes", "no"],
        help="weights in <output>.data: by size (auto, above 1 GiB), always, never",
    )
    parser.set_defaults(func=run)


def run_gguf(args, model, tokenizer, qmodel) -> int:
    from mpqc.export import llama_quantize_args, to_gguf

    if args.llama_quantize_args:
        print(" ".join(llama_quantize_args(qmodel)))
        if not args.gguf:
            return 0
    source = getattr(model, "mpqc_source", None)
    gguf_source = None
    if source is not None and source.gguf_file:
        from pathlib import Path

        gguf_source = Path(source.path) / source.gguf_file
    result = to_gguf(qmodel, args.gguf, source=gguf_source, tokenizer=tokenizer)
    counts = {}
    for t in result.tensor_types.values():
        counts[t] = counts.get(t, 0) + 1
    s = qmodel.plan.summary()
    print(
        f"wrote {result.path} ({result.bytes / 2**20:.2f} MiB): {len(result.tensor_types)} tensors "
        f"({', '.join(f'{n} {t}' for t, n in sorted(counts.items()))}); Q_r {s['quantization_ratio_params']:.3f}, "
        f"average bits {s['average_bits']:.3f}"
    )
    if args.json:
        write_json_atomic(
            args.json,
            {
                "plan": json.loads(qmodel.plan.to_json()),
                "path": result.path,
                "bytes": result.bytes,
                "tensor_types": result.tensor_types,
            },
        )
    return 0


def run(args) -> int:
    import mpqc
    from mpqc.export import to_onnx

    model, tokenizer, graph = common.load_and_capture(args.model, 64, args.device, args.dtype)
    plan = common.plan_from_args(graph, args)
    qmodel = mpqc.compile(graph, plan)
    if args.gguf or args.llama_quantize_args:
        return run_gguf(args, model, tokenizer, qmodel)
    external = {"auto": None, "yes": True, "no": False}[args.external_data]
    result = to_onnx(qmodel, args.output, opset=args.opset, fp_weights=args.fp_weights, external_data=external)
    s = plan.summary()
    data = f", data in {result.data_path}" if result.data_path else ""
    print(f"plan: {plan}")
    print(
        f"wrote {result.path} ({result.file_bytes / 2**20:.2f} MiB{data}): "
        f"{result.weights} low-bit weights ({result.weight_bytes / 2**20:.2f} MiB), {result.activations} activation "
        f"quantizers, opset {result.opset}, fp weights as {result.fp_weights}; Q_r {s['quantization_ratio_params']:.3f}, "
        f"average bits {s['average_bits']:.3f}; {sum(result.seconds.values()):.1f} s"
    )
    if args.json:
        write_json_atomic(
            args.json,
            {
                "model": args.model or "smollm2-135m",
                "model_class": graph.model_class,
                "plan": json.loads(plan.to_json()),
                **result.to_dict(),
            },
        )
    return 0
