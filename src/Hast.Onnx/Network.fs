/// The Hast network under construction while an ONNX graph is interpreted (`Operators`, `Import`):
/// the value of every ONNX name so far, a constant or an image-dependent value, and the graph nodes,
/// constants and weights gathered in order, under unique names TorchSharp accepts.
module internal Hast.Onnx.Network

open System
open System.Collections.Generic
open TorchSharp
open Onnx
open Hast.Core
open Hast.Core.Models.Graph

type private Tensor = torch.Tensor

/// A value while the graph is interpreted: a constant, or an image-dependent value (its number in the
/// topology and its batch-1 dummy, which gives its shape).
type Val =
    | Known of torch.Tensor
    | Dyn of value: int * dummy: torch.Tensor

/// A name TorchSharp accepts for a child module or buffer: letters, digits and '_' only.
let private sanitize (s: string) =
    String(s.ToCharArray() |> Array.map (fun c -> if Char.IsAsciiLetterOrDigit c || c = '_' then c else '_')).Trim('_')

/// `base`, or `base_2`, `base_3`, ... : the first not in `taken` (which it joins).
let private unique (taken: HashSet<string>) (b: string) =
    let rec go i =
        let n = if i = 1 then b else sprintf "%s_%d" b i
        if taken.Add n then n else go (i + 1)
    go 1

/// The interpretation of one graph: nodes, constants and weights gathered in order.
type Network() =
    let env = Dictionary<string, Val>()
    let nodeNames = HashSet<string>([ "const" ])
    let nodes = List<Node>()
    let weights = List<string * Tensor>()
    let constants = List<string * int64[]>()
    let constantOf = Dictionary<string, string>()
    let constNames = HashSet<string>()
    let depth = Dictionary<int, int>([ KeyValuePair(inputValue, 0) ])
    /// value -> name of the Linear node (from a MatMul) whose bias a following Add may still give
    let openBias = Dictionary<int, string>()
    let mutable next = 1
    let mutable folded = 0

    /// The value of each ONNX name interpreted so far.
    member _.Env = env
    member _.Nodes = List.ofSeq nodes
    member _.Weights = List.ofSeq weights
    member _.Constants = List.ofSeq constants
    /// The number of shape-computation nodes evaluated at import.
    member _.Folded = folded
    member _.CountFolded() = folded <- folded + 1

    /// A unique module name for the node (`suffix` for helper nodes made for it).
    member _.NameFor(n: NodeProto, index: int, suffix: string) =
        let b = sanitize n.Name
        let b = if b = "" || b = "const" then sprintf "%s_%d" (n.OpType.ToLowerInvariant()) index else b
        let b = if Char.IsDigit b[0] then "n" + b else b
        unique nodeNames (b + suffix)

    /// `name`, or `name_2`, ...: a module name no node has yet.
    member _.Unique(name: string) = unique nodeNames name

    member _.Weight(name: string, t: Tensor) =
        weights.Add(name, t.to_type(torch.float32).contiguous())

    member _.SetWeight(name: string, t: Tensor) =
        let i = weights.FindIndex(fun (k, _) -> k = name)
        weights[i] <- (name, t.to_type(torch.float32).contiguous())

    /// The operand of a value: a constant is registered (once per ONNX name) as `const.<name>`.
    member _.Operand(onnxName: string, v: Val) : Operand =
        match v with
        | Dyn(i, _) -> Value i
        | Known t ->
            match constantOf.TryGetValue onnxName with
            | true, c -> Constant c
            | _ ->
                let b = sanitize onnxName
                let c = unique constNames (if b = "" then "c" else b)
                constantOf[onnxName] <- c
                constants.Add(c, t.shape)
                weights.Add("const." + c, t.to_type(torch.float32).contiguous())
                Constant c

    /// Add a node; returns the value numbers of its outputs.
    member _.Add(name: string, op: Op, inputs: Operand list, outputs: int, ?body: int) : int list =
        let outs = [ for _ in 1 .. outputs -> (next <- next + 1; next - 1) ]
        let d =
            inputs |> List.fold (fun m o -> match o with Value v -> max m depth[v] | Constant _ -> m) 0
        let d = match op with Conv _ -> d + 1 | _ -> d
        for o in outs do depth[o] <- d
        nodes.Add { Name = name; Op = op; Inputs = inputs; Outputs = outs; Body = body }
        outs

    /// The number of convolutions on the longest path from the input to value `v`.
    member _.Depth(v: int) = depth[v]
    member _.OpenBias = openBias

/// What every node of one import shares: the model's name (`what`, the start of every message), its
/// default-domain opset, the network so far, how many nodes read each ONNX name, and the final
/// Softmax-like operators removed (for the notes).
type Context =
    { What: string
      Opset: int64
      Net: Network
      Consumers: Dictionary<string, int>
      Removed: List<string> }

/// One node of the graph (the `index`th) being interpreted: its inputs as values, and what binds its
/// outputs.
type NodeStep(c: Context, index: int, n: NodeProto) =
    let net = c.Net
    let fail (msg: string) : 'a = failf "%s: node '%s' (%s): %s" c.What n.Name n.OpType msg
    let inputAt (i: int) : (string * Val) option =
        if i < n.Input.Count && n.Input[i] <> "" then
            match net.Env.TryGetValue n.Input[i] with
            | true, v -> Some(n.Input[i], v)
            | _ -> fail (sprintf "its input '%s' is computed by no earlier node (the graph is not in order)" n.Input[i])
        else None
    let valAt i = inputAt i |> Option.map snd
    let known i =
        match valAt i with
        | Some(Known t) -> t
        | Some(Dyn _) -> fail (sprintf "input %d must be a constant (an initializer or shape arithmetic), not an image-dependent value" i)
        | None -> fail (sprintf "input %d is missing" i)
    let allKnown =
        n.Input |> Seq.filter (fun s -> s <> "") |> Seq.forall (fun s -> match net.Env.TryGetValue s with | true, Known _ -> true | _ -> false)

    member _.Context = c
    member _.Net = net
    member _.Node = n
    /// The model's default-domain opset.
    member _.Opset = c.Opset
    /// Fail with the model's and the node's names before `msg`.
    member _.Fail<'a>(msg: string) : 'a = fail msg
    /// The name and value of input `i`; None when the node has no input `i`.
    member _.InputAt(i: int) = inputAt i
    /// Input `i`, which the node needs.
    member _.Req(i: int) = match valAt i with Some v -> v | None -> fail (sprintf "input %d is missing" i)
    /// Input `i`, which must be a constant.
    member _.Known(i: int) = known i
    /// Optional input `i`, a constant when present.
    member _.KnownOpt(i: int) = match valAt i with Some(Known t) -> Some t | Some(Dyn _) -> known i |> Some | None -> None
    /// Input `i`, which must depend on the image: its value number and dummy.
    member this.Dyn(i: int) = match this.Req i with Dyn(v, d) -> v, d | Known _ -> fail (sprintf "input %d must be image-dependent" i)
    /// True when every input the node has is a constant.
    member _.AllKnown = allKnown
    /// Bind the node's (first) output.
    member _.Bind(v: Val) = net.Env[n.Output[0]] <- v
    /// A unique module name for the node.
    member _.NodeName() = net.NameFor(n, index, "")
    /// Add a function node computed on the dummies; binds its outputs (as many as the node has).
    member this.Func(op: Op, operands: (string * Val) list) =
        let ds = operands |> List.map (fun (_, v) -> match v with Dyn(_, d) -> d | Known t -> t.to_type(torch.float32))
        let out = applyFunction op ds
        let vs = net.Add(this.NodeName(), op, operands |> List.map net.Operand, out.Length)
        List.iteri2 (fun i v d -> if i < n.Output.Count then net.Env[n.Output[i]] <- Dyn(v, d)) vs out
    /// Add a layer node `nm` on value `x` whose output on the dummy is `out`; returns its value.
    member this.Layer(op: Op, x: int, out: Tensor, nm: string) =
        let v = net.Add(nm, op, [ Value x ], 1) |> List.head
        this.Bind(Dyn(v, out))
        v
    /// Ints from an attribute (opsets before `fromOpset`) or an input.
    member this.IntsFrom(attrName: string, input: int, fromOpset: int64) =
        if c.Opset < fromOpset then Decode.attrInts n attrName else this.KnownOpt input |> Option.map Decode.longs

/// Fail at a node with a format: "<model>: node '<name>' (<op>): <message>".
let failAt (s: NodeStep) fmt = Printf.ksprintf (fun m -> s.Fail m) fmt
