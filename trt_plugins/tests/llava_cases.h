// The LLaVA-1.5-7B cases shared by gpu_check.cu (the kernel launchers) and gpu_enqueue.cu (the
// plugins' enqueue): B = 1 and 8, 576 visual tokens, hidden size 4096, float32 and float16.
// Each case holds its inputs in the plugin's input order, the CPU path's outputs (runOnHost:
// the kernels' own per-element functions run serially), an independent brute-force check of
// those outputs, and the bytes an ideal kernel reads and writes. The device side (buffers,
// CUDA-event timing, comparison) and the table rows are here too, so both programs print the
// same table. Compiled by nvcc only (it uses __half on the host); includes no TensorRT header.
#pragma once

#include "../RankKeepCount/rank_keep_count.h"
#include "../TokenPrune/token_prune.h"
#include "../TokenRecycle/token_recycle.h"
#include "../TopKTokenSelect/topk_token_select.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "check.h"

namespace sparsevlm_tests
{

using namespace sparsevlm;

// --- The model's shapes --------------------------------------------------------------------------
constexpr int64_t kVisualTokens = 576;  // LLaVA-1.5: 24 x 24 CLIP patches
constexpr int64_t kHidden = 4096;       // Vicuna-7B
constexpr int64_t kTopK = 192;          // FasterVLM / FastV at a 192-token budget
constexpr int64_t kMergedSlots = 18;    // TokenRecycle's C for V = 576 (candidate 30 %, divisor 10)
constexpr int64_t kRaters = 64;         // text rows rating the visual tokens
constexpr int64_t kKeepSchedule[] = {300, 200, 110, 66, 303, 238, 48, 576}; // v1.5 keep counts, and all kept
constexpr int64_t kBatches[] = {1, 8};

enum class Op
{
    kTopK,
    kPrune,
    kRecycle,
    kRank
};
enum class Kind
{
    kF32,
    kF16,
    kI32,
    kI64
};

inline size_t sizeOf(Kind kind)
{
    return kind == Kind::kF16 ? 2 : (kind == Kind::kI64 ? 8 : 4);
}

// One tensor: its shape, element kind and host bytes. `tolerance` < 0: outputs must match bit
// for bit; otherwise |device - host| <= tolerance * (1 + |host|) per element.
struct Tensor
{
    std::string name;
    std::vector<int64_t> shape;
    Kind kind;
    std::vector<unsigned char> bytes;
    float tolerance = -1.0F;

    int64_t count() const
    {
        return std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<int64_t>());
    }
    template <typename E>
    E* as()
    {
        return reinterpret_cast<E*>(bytes.data());
    }
    template <typename E>
    E const* as() const
    {
        return reinterpret_cast<E const*>(bytes.data());
    }
    float floatAt(int64_t i) const
    {
        return kind == Kind::kF16 ? __half2float(as<__half>()[i]) : as<float>()[i];
    }
};

inline Tensor makeTensor(std::string name, std::vector<int64_t> shape, Kind kind)
{
    Tensor t{std::move(name), std::move(shape), kind, {}};
    t.bytes.assign(static_cast<size_t>(t.count()) * sizeOf(kind), 0);
    return t;
}

struct Case
{
    Op op;
    char const* opName;
    ElementType type;
    char const* typeName;
    int64_t batch;
    std::string shapeText;             // the row's shape column
    std::vector<Tensor> inputs;        // in the plugin's input order
    std::vector<Tensor> outputs;       // the CPU path's results
    int64_t workspaceBytes = 0;
    double bytesMoved = 0.0;           // see bytesFormula()
    double flops = 0.0;                // see flopsFormula(); < 0: not known (the CPU path did not run)
    double hostMilliseconds = -1.0;    // the CPU path, serial (-1: not run)
    // Launch parameters (the ones the op uses).
    int64_t k = 0;
    prune::Shape pruneShape{};
    recycle::Shape recycleShape{};
    rankkeep::Shape rankShape{};
    rankkeep::RuleParams rankParams{};
};

// Compulsory traffic of each op: every input element it needs read once, every output written
// once; s = sizeof(T). Workspaces and re-reads (the O(V) rank loops re-read the scores, DPC-kNN
// re-reads candidate rows) are not counted, so GB/s is a lower bound on the bus traffic.
inline char const* bytesFormula(Op op)
{
    switch (op)
    {
    case Op::kTopK: return "B*N*s (scores) + 2*B*k*D*s (rows read, selected written) + 8*B*k (indices)";
    case Op::kPrune:
        return "B*V*(s+4) (scores, visual_valid) + 8*B (keep_count) + 4*B*C (merged_valid) + G*D*s (G = rows gathered: kept + valid merged) "
               "+ B*W*D*s (pruned) + 12*B*W (pruned_valid, source_index)";
    case Op::kRecycle:
        return "B*V*(s+4) (scores, visual_valid) + 8*B (keep_count) + P*D*s (P = candidate rows, all batch rows) "
               "+ B*C*(D*s+4) (merged, merged_valid)";
    case Op::kRank: return "B*T*V*s (rater_attention) + 4*B*(T+V) (masks) + 16*B (rank, keep_count)";
    }
    return "";
}

// Floating-point operations of each op (the arithmetic the result needs, not what a kernel
// happens to repeat): none for the gathers; TokenRecycle's Gram product and merge; the Jacobi
// SVD as the CPU path ran it (its sweeps depend on the data).
inline char const* flopsFormula(Op op)
{
    switch (op)
    {
    case Op::kTopK: return "none (a selection and a gather)";
    case Op::kPrune: return "none (a selection and a gather)";
    case Op::kRecycle:
        return "sum over rows of 2*P*P*D (the Gram product X X^T of the row's P candidates; the kernel "
               "computes its tiles on and above the diagonal, about half) + P*D (the merge's sums)";
    case Op::kRank:
        return "per Jacobi pair visited 6*L, per pair rotated 6*L more, plus 2*c*L for the norms "
               "(c = min(m, n), L = max(m, n); pairs as the CPU path's sweeps visited them)";
    }
    return "";
}

// --- Inputs -----------------------------------------------------------------------------------------

inline std::mt19937& randomSource()
{
    static std::mt19937 source(20240607);
    return source;
}

// Normal values; `distinct` > 0 draws from {0 .. distinct-1} instead (many ties).
inline Tensor randomFloats(std::string name, std::vector<int64_t> shape, ElementType type, int distinct = 0)
{
    Tensor t = makeTensor(std::move(name), std::move(shape), type == ElementType::kFLOAT16 ? Kind::kF16 : Kind::kF32);
    std::normal_distribution<float> normal;
    std::uniform_int_distribution<int> small(0, distinct > 0 ? distinct - 1 : 0);
    for (int64_t i = 0; i < t.count(); ++i)
    {
        float const v = distinct > 0 ? static_cast<float>(small(randomSource())) : normal(randomSource());
        if (t.kind == Kind::kF16)
        {
            t.as<__half>()[i] = __float2half(v);
        }
        else
        {
            t.as<float>()[i] = v;
        }
    }
    return t;
}

inline Tensor randomMask(std::string name, std::vector<int64_t> shape, double probability)
{
    Tensor t = makeTensor(std::move(name), std::move(shape), Kind::kI32);
    std::bernoulli_distribution set(probability);
    for (int64_t i = 0; i < t.count(); ++i)
    {
        t.as<int32_t>()[i] = set(randomSource()) ? 1 : 0;
    }
    return t;
}

inline int64_t countSet(int32_t const* mask, int64_t n)
{
    return std::count_if(mask, mask + n, [](int32_t m) { return m != 0; });
}

// keep_count[b]: the schedule's count, at most the row's valid tokens.
inline Tensor keepCounts(Tensor const& visualValid, int64_t batch, int64_t numVisual)
{
    Tensor keep = makeTensor("keep_count", {batch}, Kind::kI64);
    for (int64_t b = 0; b < batch; ++b)
    {
        int64_t const schedule = kKeepSchedule[b % (sizeof(kKeepSchedule) / sizeof(kKeepSchedule[0]))];
        keep.as<int64_t>()[b] = std::min(schedule, countSet(visualValid.as<int32_t>() + b * numVisual, numVisual));
    }
    return keep;
}

// --- The CPU path -------------------------------------------------------------------------------------

template <typename T>
void runHost(Case& c)
{
    std::vector<unsigned char> workspace(static_cast<size_t>(c.workspaceBytes) + 256);
    std::vector<Tensor>& in = c.inputs;
    std::vector<Tensor>& out = c.outputs;
    auto const start = std::chrono::steady_clock::now();
    switch (c.op)
    {
    case Op::kTopK:
        topk::runOnHost(in[0].as<T>(), in[1].as<T>(), out[0].as<T>(), out[1].as<int64_t>(), c.batch, in[0].shape[1],
            in[0].shape[2], c.k, workspace.data());
        break;
    case Op::kPrune:
        prune::runOnHost(in[0].as<T>(), in[1].as<T>(), in[2].as<int32_t>(), in[3].as<int64_t>(), in[4].as<T>(),
            in[5].as<int32_t>(), out[0].as<T>(), out[1].as<int32_t>(), out[2].as<int64_t>(), c.pruneShape,
            workspace.data());
        break;
    case Op::kRecycle:
        recycle::runOnHost(in[0].as<T>(), in[1].as<T>(), in[2].as<int32_t>(), in[3].as<int64_t>(), out[0].as<T>(),
            out[1].as<int32_t>(), c.recycleShape, workspace.data());
        break;
    case Op::kRank:
    {
        rankkeep::JacobiWork work;
        rankkeep::runOnHost(in[0].as<T>(), in[1].as<int32_t>(), in[2].as<int32_t>(), out[0].as<int64_t>(),
            out[1].as<int64_t>(), c.rankShape, c.rankParams, workspace.data(), &work);
        c.flops = work.flops;
        break;
    }
    }
    c.hostMilliseconds = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
}

// --- Independent checks of the CPU path (brute force with std::stable_sort, hand-built ranks) -------

// The `keep` best valid slots of one row, ascending: a stable sort by descending score (the
// order of host_device.h without NaN, which the inputs here never hold).
inline std::vector<int64_t> bestSlots(Tensor const& scores, int32_t const* valid, int64_t b, int64_t n, int64_t keep)
{
    std::vector<int64_t> slots;
    for (int64_t i = 0; i < n; ++i)
    {
        if (valid == nullptr || valid[b * n + i] != 0)
        {
            slots.push_back(i);
        }
    }
    std::stable_sort(slots.begin(), slots.end(),
        [&](int64_t x, int64_t y) { return scores.floatAt(b * n + x) > scores.floatAt(b * n + y); });
    slots.resize(static_cast<size_t>(std::min<int64_t>(keep, static_cast<int64_t>(slots.size()))));
    std::sort(slots.begin(), slots.end());
    return slots;
}

inline bool sameRow(Tensor const& a, int64_t rowA, Tensor const& b, int64_t rowB, int64_t dim)
{
    size_t const s = sizeOf(a.kind);
    return std::memcmp(a.bytes.data() + rowA * dim * s, b.bytes.data() + rowB * dim * s, dim * s) == 0;
}

inline bool zeroRow(Tensor const& a, int64_t row, int64_t dim)
{
    for (int64_t d = 0; d < dim; ++d)
    {
        if (a.floatAt(row * dim + d) != 0.0F)
        {
            return false;
        }
    }
    return true;
}

inline std::string rowLabel(Case const& c)
{
    return std::string(c.opName) + " " + c.typeName + " B=" + std::to_string(c.batch);
}

inline void checkHostPath(Case const& c)
{
    std::string const label = rowLabel(c) + " CPU path vs brute force";
    std::vector<Tensor> const& in = c.inputs;
    std::vector<Tensor> const& out = c.outputs;
    bool ok = true;
    switch (c.op)
    {
    case Op::kTopK:
    {
        int64_t const n = in[0].shape[1];
        int64_t const dim = in[0].shape[2];
        for (int64_t b = 0; b < c.batch; ++b)
        {
            std::vector<int64_t> const want = bestSlots(in[1], nullptr, b, n, c.k);
            for (int64_t j = 0; j < c.k; ++j)
            {
                ok = ok && out[1].as<int64_t>()[b * c.k + j] == want[j]
                    && sameRow(out[0], b * c.k + j, in[0], b * n + want[j], dim);
            }
        }
        break;
    }
    case Op::kPrune:
    {
        prune::Shape const& s = c.pruneShape;
        for (int64_t b = 0; b < s.batch; ++b)
        {
            std::vector<int64_t> sources
                = bestSlots(in[1], in[2].as<int32_t>(), b, s.numVisual, in[3].as<int64_t>()[b]);
            for (int64_t m = 0; m < s.numMerged; ++m)
            {
                if (in[5].as<int32_t>()[b * s.numMerged + m] != 0)
                {
                    sources.push_back(s.numVisual + m);
                }
            }
            sources.resize(static_cast<size_t>(s.width), -1);
            for (int64_t j = 0; j < s.width; ++j)
            {
                int64_t const source = sources[j];
                int64_t const at = b * s.width + j;
                bool const row = source < 0 ? zeroRow(out[0], at, s.dim)
                    : source < s.numVisual   ? sameRow(out[0], at, in[0], b * s.numVisual + source, s.dim)
                                             : sameRow(out[0], at, in[4], b * s.numMerged + source - s.numVisual, s.dim);
                ok = ok && out[2].as<int64_t>()[at] == source && out[1].as<int32_t>()[at] == (source >= 0 ? 1 : 0)
                    && row;
            }
        }
        break;
    }
    case Op::kRecycle:
    {
        // The cluster count follows from the deleted count alone; merged rows past it are zero
        // and every merged value is finite.
        recycle::Shape const& s = c.recycleShape;
        int64_t const width = s.clusterBound();
        for (int64_t b = 0; b < s.batch; ++b)
        {
            int64_t const valid = countSet(in[2].as<int32_t>() + b * s.numVisual, s.numVisual);
            int64_t const deleted = valid - std::min(valid, in[3].as<int64_t>()[b]);
            int64_t const pool = deleted == 0 ? 0 : s.candidatePercent * deleted / 100 + 1;
            int64_t const clusters = pool == 0 ? 0 : pool / s.clusterDivisor + 1;
            for (int64_t j = 0; j < width; ++j)
            {
                ok = ok && out[1].as<int32_t>()[b * width + j] == (j < clusters ? 1 : 0)
                    && (j < clusters || zeroRow(out[0], b * width + j, s.dim));
                for (int64_t d = 0; d < s.dim; ++d)
                {
                    ok = ok && std::isfinite(out[0].floatAt((b * width + j) * s.dim + d));
                }
            }
        }
        break;
    }
    case Op::kRank:
    {
        // Row b repeats its first rankOfRow(b) rater rows: that is its rank exactly.
        rankkeep::Shape const& s = c.rankShape;
        for (int64_t b = 0; b < s.batch; ++b)
        {
            int64_t const wantRank = std::min<int64_t>(8 + 8 * b, s.numRaters);
            int64_t const valid = countSet(in[2].as<int32_t>() + b * s.numVisual, s.numVisual);
            int64_t const wantKeep = valid == wantRank
                ? valid
                : std::clamp<int64_t>(static_cast<int64_t>(wantRank * c.rankParams.scale + c.rankParams.bias), 0,
                    valid - 1);
            ok = ok && out[0].as<int64_t>()[b] == wantRank && out[1].as<int64_t>()[b] == wantKeep;
        }
        break;
    }
    }
    check(ok, label);
}

// --- The cases ------------------------------------------------------------------------------------------

// One case; `withCpuPath` runs the CPU path (and its brute-force check) for the outputs, which
// only a comparison with the device needs.
template <typename T>
Case makeCase(Op op, int64_t batch, bool withCpuPath)
{
    Case c{};
    c.op = op;
    c.batch = batch;
    c.type = sizeof(T) == 2 ? ElementType::kFLOAT16 : ElementType::kFLOAT32;
    c.typeName = sizeof(T) == 2 ? "float16" : "float32";
    Kind const floatKind = sizeof(T) == 2 ? Kind::kF16 : Kind::kF32;
    double const s = sizeof(T);
    int64_t const V = kVisualTokens;
    int64_t const D = kHidden;
    switch (op)
    {
    case Op::kTopK:
    {
        c.opName = "TopKTokenSelect";
        c.k = kTopK;
        c.shapeText = "N=576 D=4096 k=192";
        c.inputs = {randomFloats("tokens", {batch, V, D}, c.type), randomFloats("scores", {batch, V}, c.type, 97)};
        c.outputs = {makeTensor("selected", {batch, c.k, D}, floatKind), makeTensor("indices", {batch, c.k}, Kind::kI64)};
        c.workspaceBytes = topk::workspaceSize(batch, V);
        c.bytesMoved = batch * V * s + 2.0 * batch * c.k * D * s + 8.0 * batch * c.k;
        break;
    }
    case Op::kPrune:
    {
        c.opName = "TokenPrune";
        Tensor visualValid = randomMask("visual_valid", {batch, V}, 0.98);
        Tensor mergedValid = randomMask("merged_valid", {batch, kMergedSlots}, 0.6);
        Tensor keep = keepCounts(visualValid, batch, V);
        // W as the runtime picks it: the widest row's kept + valid merged tokens.
        int64_t width = 1;
        for (int64_t b = 0; b < batch; ++b)
        {
            width = std::max(width,
                keep.as<int64_t>()[b] + countSet(mergedValid.as<int32_t>() + b * kMergedSlots, kMergedSlots));
        }
        c.pruneShape = prune::Shape{batch, V, kMergedSlots, D, width};
        c.shapeText = "V=576 C=18 D=4096 W=" + std::to_string(width);
        c.inputs = {randomFloats("visual", {batch, V, D}, c.type), randomFloats("scores", {batch, V}, c.type, 97),
            std::move(visualValid), std::move(keep), randomFloats("merged", {batch, kMergedSlots, D}, c.type),
            std::move(mergedValid), makeTensor("out_width", {width}, Kind::kI64)};
        c.outputs = {makeTensor("pruned", {batch, width, D}, floatKind),
            makeTensor("pruned_valid", {batch, width}, Kind::kI32), makeTensor("source_index", {batch, width}, Kind::kI64)};
        c.workspaceBytes = prune::workspaceSize(batch, V);
        break;
    }
    case Op::kRecycle:
    {
        c.opName = "TokenRecycle";
        c.recycleShape = recycle::Shape{batch, V, D, 30, 10};
        int64_t const clusters = c.recycleShape.clusterBound();
        c.shapeText = "V=576 D=4096 C=" + std::to_string(clusters);
        Tensor visualValid = randomMask("visual_valid", {batch, V}, 0.98);
        Tensor keep = keepCounts(visualValid, batch, V);
        c.inputs = {randomFloats("visual", {batch, V, D}, c.type), randomFloats("scores", {batch, V}, c.type),
            std::move(visualValid), std::move(keep)};
        // The device may contract a * b + c into one FMA where the host rounds twice: close, not
        // equal; in float16 that can move the stored value by one unit in the last place.
        c.outputs = {makeTensor("merged", {batch, clusters, D}, floatKind),
            makeTensor("merged_valid", {batch, clusters}, Kind::kI32)};
        c.outputs[0].tolerance = sizeof(T) == 2 ? 2e-3F : 1e-4F;
        c.workspaceBytes = recycle::workspaceSize(c.recycleShape);
        break;
    }
    case Op::kRank:
    {
        c.opName = "RankKeepCount";
        c.rankShape = rankkeep::Shape{batch, kRaters, V};
        c.rankParams = rankkeep::RuleParams{rankkeep::Rule::kV10, 13.5, 0.0, 0.0}; // v1.0 preset for 192
        c.shapeText = "T=64 V=576";
        Tensor attention = randomFloats("rater_attention", {batch, kRaters, V}, c.type);
        size_t const row = static_cast<size_t>(V) * sizeOf(floatKind);
        for (int64_t b = 0; b < batch; ++b)
        {
            int64_t const rank = std::min<int64_t>(8 + 8 * b, kRaters); // checkHostPath's expectation
            for (int64_t t = rank; t < kRaters; ++t)
            {
                std::memcpy(attention.bytes.data() + (b * kRaters + t) * row,
                    attention.bytes.data() + (b * kRaters + t % rank) * row, row);
            }
        }
        Tensor raters = randomMask("rater_mask", {batch, kRaters}, 1.0); // every rater: the rank stays known
        c.inputs = {std::move(attention), std::move(raters), randomMask("visual_valid", {batch, V}, 0.95)};
        c.outputs = {makeTensor("rank", {batch}, Kind::kI64), makeTensor("keep_count", {batch}, Kind::kI64)};
        c.workspaceBytes = rankkeep::workspaceSize(c.rankShape);
        c.bytesMoved = batch * kRaters * V * s + 4.0 * batch * (kRaters + V) + 16.0 * batch;
        c.flops = -1.0; // the CPU path counts them
        break;
    }
    }
    // Byte counts that depend on the masks and keep counts (gathered rows, candidate rows).
    if (op == Op::kPrune)
    {
        prune::Shape const& p = c.pruneShape;
        int64_t gathered = 0; // kept + valid merged per row: all fit in W, which is their maximum
        for (int64_t b = 0; b < batch; ++b)
        {
            gathered += c.inputs[3].as<int64_t>()[b] + countSet(c.inputs[5].as<int32_t>() + b * p.numMerged, p.numMerged);
        }
        c.bytesMoved = batch * V * (s + 4) + 8.0 * batch + 4.0 * batch * p.numMerged + gathered * D * s
            + batch * p.width * D * s + 12.0 * batch * p.width;
    }
    else if (op == Op::kRecycle)
    {
        int64_t candidates = 0;
        for (int64_t b = 0; b < batch; ++b)
        {
            int64_t const valid = countSet(c.inputs[2].as<int32_t>() + b * V, V);
            int64_t const pool = recycle::poolSize(valid - std::min(valid, c.inputs[3].as<int64_t>()[b]), 30);
            candidates += pool;
            c.flops += 2.0 * pool * pool * D + static_cast<double>(pool) * D;
        }
        c.bytesMoved = batch * V * (s + 4) + 8.0 * batch + candidates * D * s
            + batch * c.recycleShape.clusterBound() * (D * s + 4);
    }
    if (withCpuPath)
    {
        runHost<T>(c);
        checkHostPath(c);
    }
    return c;
}

// Every case, in table order: op, then type, then B. `visit` gets each case before the next
// one is made (they hold up to ~300 MB each at B = 8).
template <typename Visit>
void forEachCase(bool withCpuPath, Visit visit)
{
    for (Op op : {Op::kTopK, Op::kPrune, Op::kRecycle, Op::kRank})
    {
        for (bool half : {false, true})
        {
            for (int64_t batch : kBatches)
            {
                Case c = half ? makeCase<__half>(op, batch, withCpuPath) : makeCase<float>(op, batch, withCpuPath);
                visit(c);
            }
        }
    }
}

// --- The device side ------------------------------------------------------------------------------------

struct DeviceTensors
{
    std::vector<void*> inputs;
    std::vector<void*> outputs;
    void* workspace = nullptr;
    cudaError_t status = cudaSuccess;

    explicit DeviceTensors(Case const& c)
    {
        for (Tensor const& t : c.inputs)
        {
            inputs.push_back(allocate(t.bytes.size()));
            record(cudaMemcpy(inputs.back(), t.bytes.data(), t.bytes.size(), cudaMemcpyHostToDevice));
        }
        for (Tensor const& t : c.outputs)
        {
            outputs.push_back(allocate(t.bytes.size()));
        }
        workspace = allocate(static_cast<size_t>(c.workspaceBytes));
        fillOutputsWithGarbage(c);
    }
    ~DeviceTensors()
    {
        for (void* p : inputs)
        {
            cudaFree(p);
        }
        for (void* p : outputs)
        {
            cudaFree(p);
        }
        cudaFree(workspace);
    }
    DeviceTensors(DeviceTensors const&) = delete;
    DeviceTensors& operator=(DeviceTensors const&) = delete;

    // Every output element must be written by the op: start from 0x7F bytes.
    void fillOutputsWithGarbage(Case const& c)
    {
        for (size_t i = 0; i < outputs.size(); ++i)
        {
            record(cudaMemset(outputs[i], 0x7F, c.outputs[i].bytes.size() + 1));
        }
    }
    std::vector<Tensor> download(Case const& c)
    {
        std::vector<Tensor> got = c.outputs;
        for (size_t i = 0; i < outputs.size(); ++i)
        {
            record(cudaMemcpy(got[i].bytes.data(), outputs[i], got[i].bytes.size(), cudaMemcpyDeviceToHost));
        }
        return got;
    }

private:
    void* allocate(size_t bytes)
    {
        void* p = nullptr;
        record(cudaMalloc(&p, bytes + 256)); // + 256: a zero-sized tensor still gets an address
        return p;
    }
    void record(cudaError_t e)
    {
        status = status == cudaSuccess ? e : status;
    }
};

// Device outputs against the CPU path's: bit for bit, or within the output's tolerance.
inline void compareOutputs(Case const& c, std::vector<Tensor> const& got, std::string const& label)
{
    for (size_t i = 0; i < got.size(); ++i)
    {
        Tensor const& want = c.outputs[i];
        bool same = true;
        if (want.tolerance < 0.0F)
        {
            same = got[i].bytes == want.bytes;
        }
        else
        {
            for (int64_t e = 0; same && e < want.count(); ++e)
            {
                float const x = got[i].floatAt(e);
                float const y = want.floatAt(e);
                same = std::fabs(x - y) <= want.tolerance * (1.0F + std::fabs(y));
            }
        }
        check(same, label + ": " + want.name + " differs from the CPU path");
    }
}

struct Timing
{
    bool measured = false;
    double medianMilliseconds = 0.0;
};

// `launch(stream)` -> cudaError_t (or 0 for success). Checks the first call's outputs against
// the CPU path, times `runs` calls after `warmup` with CUDA events (median), and checks that
// the outputs after the timed calls are still the same.
template <typename Launch>
Timing runAndTime(Case const& c, std::string const& label, int warmup, int runs, Launch launch)
{
    Timing timing;
    DeviceTensors device(c);
    cudaStream_t stream = nullptr;
    cudaStreamCreate(&stream);
    cudaError_t status = device.status;
    auto const call = [&]()
    {
        if (status == cudaSuccess)
        {
            status = launch(device, stream);
        }
    };
    call();
    status = status == cudaSuccess ? cudaStreamSynchronize(stream) : status;
    check(status == cudaSuccess, label + ": launch (" + cudaGetErrorString(status) + ")");
    if (status != cudaSuccess)
    {
        cudaStreamDestroy(stream);
        cudaGetLastError(); // clear a sticky launch error for the next case where possible
        return timing;
    }
    compareOutputs(c, device.download(c), label);

    for (int i = 0; i < warmup; ++i)
    {
        call();
    }
    cudaEvent_t begin, end;
    cudaEventCreate(&begin);
    cudaEventCreate(&end);
    std::vector<float> times;
    for (int i = 0; i < runs && status == cudaSuccess; ++i)
    {
        cudaEventRecord(begin, stream);
        call();
        cudaEventRecord(end, stream);
        cudaEventSynchronize(end);
        float ms = 0.0F;
        cudaEventElapsedTime(&ms, begin, end);
        times.push_back(ms);
    }
    status = status == cudaSuccess ? cudaStreamSynchronize(stream) : status;
    check(status == cudaSuccess, label + ": timed launches (" + cudaGetErrorString(status) + ")");
    if (status == cudaSuccess && !times.empty())
    {
        std::sort(times.begin(), times.end());
        timing.measured = true;
        timing.medianMilliseconds = times[times.size() / 2];
        compareOutputs(c, device.download(c), label + " (after " + std::to_string(warmup + runs) + " more launches)");
    }
    cudaEventDestroy(begin);
    cudaEventDestroy(end);
    cudaStreamDestroy(stream);
    return timing;
}

// --- The table --------------------------------------------------------------------------------------------

inline void printTableHeader(char const* program, char const* path, char const* mode, int warmup, int runs)
{
    std::printf("\n%s: %s at LLaVA-1.5-7B shapes%s\n", program, path, mode);
    std::printf("times: CUDA events, median of %d runs after %d warm-up runs; GB/s = bytes moved / time\n", runs,
        warmup);
    char const* const names[] = {"TopKTokenSelect", "TokenPrune", "TokenRecycle", "RankKeepCount"};
    std::printf("bytes moved (s = sizeof(T)):\n");
    for (Op op : {Op::kTopK, Op::kPrune, Op::kRecycle, Op::kRank})
    {
        std::printf("  %-16s %s\n", names[static_cast<int>(op)], bytesFormula(op));
    }
    std::printf("FLOPs (GFLOP/s = FLOPs / time):\n");
    for (Op op : {Op::kTopK, Op::kPrune, Op::kRecycle, Op::kRank})
    {
        std::printf("  %-16s %s\n", names[static_cast<int>(op)], flopsFormula(op));
    }
    std::printf("%-8s %-16s %-8s %2s  %-28s %10s %10s %10s %16s %16s %16s\n", "path", "op", "type", "B", "shape",
        "MB moved", "GFLOP", "CPU ms", "GPU ms", "GB/s", "GFLOP/s");
}

inline void printRow(char const* path, Case const& c, Timing const& timing, bool dryRun)
{
    char gpu[32];
    char rate[32];
    char flopRate[32];
    char cpu[32] = "n/a";
    char gflop[32] = "-"; // no arithmetic
    if (c.hostMilliseconds >= 0.0)
    {
        std::snprintf(cpu, sizeof cpu, "%.1f", c.hostMilliseconds);
    }
    if (c.flops > 0.0)
    {
        std::snprintf(gflop, sizeof gflop, "%.4f", c.flops / 1e9);
    }
    else if (c.flops < 0.0)
    {
        std::snprintf(gflop, sizeof gflop, "n/a"); // counted by the CPU path, which did not run
    }
    if (timing.measured)
    {
        std::snprintf(gpu, sizeof gpu, "%.4f", timing.medianMilliseconds);
        std::snprintf(rate, sizeof rate, "%.1f", c.bytesMoved / (timing.medianMilliseconds * 1e-3) / 1e9);
        if (c.flops > 0.0)
        {
            std::snprintf(flopRate, sizeof flopRate, "%.1f", c.flops / (timing.medianMilliseconds * 1e-3) / 1e9);
        }
        else
        {
            std::snprintf(flopRate, sizeof flopRate, "%s", gflop);
        }
    }
    else
    {
        std::snprintf(gpu, sizeof gpu, "%s", dryRun ? "n/a (dry run)" : "failed");
        std::snprintf(rate, sizeof rate, "%s", dryRun ? "n/a (dry run)" : "failed");
        std::snprintf(flopRate, sizeof flopRate, "%s", dryRun ? "n/a (dry run)" : "failed");
    }
    std::printf("%-8s %-16s %-8s %2lld  %-28s %10.2f %10s %10s %16s %16s %16s\n", path, c.opName, c.typeName,
        static_cast<long long>(c.batch), c.shapeText.c_str(), c.bytesMoved / 1e6, gflop, cpu, gpu, rate, flopRate);
    std::fflush(stdout);
}

} // namespace sparsevlm_tests
