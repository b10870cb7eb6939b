// cuda_shim.h -- compile CUDA C kernel sources with g++ and run them on the CPU (npconv test support).
//
// Execution model: the blocks of a grid run one after another; the threads of a block are ucontext fibers on
// one OS thread. A thread runs until it exits or reaches __syncthreads(), which switches back to the block
// scheduler; when every live thread waits at the barrier, the barrier opens. The order in which the scheduler
// resumes threads is forward (0..n-1) or reversed, so a missing barrier shows up in one of the two orders.
// Checked at run time: divergent barriers (some threads exited or wait at another barrier), the block and grid
// limits, the 48 KiB shared-memory limit. Static and dynamic shared memory are filled with 0xFF bytes (NaN as
// float or double) before every block, so reading shared memory nobody wrote gives NaN.
//
// The Python side (emulator.py) appends NPCONV_EMU_EXPORT(kernel) for every __global__ function it finds.
#pragma once
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <type_traits>
#include <utility>
#include <vector>

#define NPCONV_EMU_API extern "C" __attribute__((visibility("default")))

struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

// ---- CUDA qualifiers -------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// every static __shared__ variable lands in one section, which the scheduler poisons before each block
#define __shared__ static __attribute__((section("npconv_emu_smem"), aligned(16)))

// ---- scheduler state (internal linkage: every loaded module has its own) ----------------------------------
namespace {
uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
constexpr int warpSize = 32;

namespace emu {
enum State { RUNNING, AT_BARRIER, EXITED };
struct Fiber {
  ucontext_t ctx;
  State state;
  unsigned long barriers;  // barriers passed so far
  int line;                // source line of the barrier it waits at
};
ucontext_t scheduler;
Fiber* current = nullptr;
void (*body)(void*) = nullptr;
void* body_arg = nullptr;
unsigned char* dynamic_smem = nullptr;
int thread_order = 0;  // 0: forward, 1: reversed
char error[1024];
const size_t kStack = 64 * 1024;
std::vector<unsigned char> stacks;  // kept between launches

void fiber_main() {
  body(body_arg);
  current->state = EXITED;
}  // returns to the scheduler through uc_link

void barrier(int line) {
  current->state = AT_BARRIER;
  current->line = line;
  current->barriers++;
  swapcontext(&current->ctx, &scheduler);
}
}  // namespace emu
}  // namespace

extern "C" unsigned char __start_npconv_emu_smem[] __attribute__((weak, visibility("hidden")));
extern "C" unsigned char __stop_npconv_emu_smem[] __attribute__((weak, visibility("hidden")));

namespace {
namespace emu {
size_t static_smem() {
  return __start_npconv_emu_smem ? size_t(__stop_npconv_emu_smem - __start_npconv_emu_smem) : 0;
}

template <class... V> int fail(const char* fmt, V... v) {
  snprintf(error, sizeof error, fmt, v...);
  return 1;
}

int run_grid(dim3 g, dim3 b, size_t smem, void (*fn)(void*), void* arg) {
  const unsigned long threads = (unsigned long)b.x * b.y * b.z;
  if (b.x == 0 || b.y == 0 || b.z == 0 || b.x > 1024 || b.y > 1024 || b.z > 64 || threads > 1024)
    return fail("invalid block (%u, %u, %u): each of x, y <= 1024, z <= 64, x*y*z <= 1024 threads", b.x, b.y, b.z);
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 2147483647u || g.y > 65535 || g.z > 65535)
    return fail("invalid grid (%u, %u, %u): x in [1, 2^31-1], y and z in [1, 65535]", g.x, g.y, g.z);
  if (static_smem() + smem > 48 * 1024)
    return fail("shared memory %u bytes static + %u bytes dynamic exceeds 48 KiB", unsigned(static_smem()),
                unsigned(smem));
  const unsigned n = unsigned(threads);
  if (stacks.size() < n * kStack) stacks.resize(n * kStack);
  std::vector<Fiber> fibers(n);
  std::vector<unsigned char> dyn(smem + 16);
  dynamic_smem = dyn.data();
  body = fn;
  body_arg = arg;
  gridDim = g;
  blockDim = b;
  for (unsigned bz = 0; bz < g.z; ++bz)
    for (unsigned by = 0; by < g.y; ++by)
      for (unsigned bx = 0; bx < g.x; ++bx) {
        blockIdx = {bx, by, bz};
        if (static_smem()) memset(__start_npconv_emu_smem, 0xFF, static_smem());
        memset(dyn.data(), 0xFF, dyn.size());
        for (unsigned t = 0; t < n; ++t) {
          Fiber& f = fibers[t];
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = stacks.data() + size_t(t) * kStack;
          f.ctx.uc_stack.ss_size = kStack;
          f.ctx.uc_link = &scheduler;
          makecontext(&f.ctx, fiber_main, 0);
          f.state = RUNNING;
          f.barriers = 0;
          f.line = 0;
        }
        for (;;) {
          for (unsigned k = 0; k < n; ++k) {
            const unsigned t = thread_order ? n - 1 - k : k;
            if (fibers[t].state != RUNNING) continue;
            threadIdx = {t % b.x, (t / b.x) % b.y, t / (b.x * b.y)};
            current = &fibers[t];
            swapcontext(&scheduler, &fibers[t].ctx);
          }
          unsigned exited = 0, waiting = 0, first = n;
          for (unsigned t = 0; t < n; ++t) {
            exited += fibers[t].state == EXITED;
            if (fibers[t].state == AT_BARRIER) {
              waiting++;
              if (first == n) first = t;
            }
          }
          if (waiting == 0) break;  // every thread of the block has exited
          if (exited)
            return fail("block (%u, %u, %u): %u threads wait at __syncthreads() (line %u) while %u threads have "
                        "exited (divergent barrier)", bx, by, bz, waiting, unsigned(fibers[first].line), exited);
          for (unsigned t = 0; t < n; ++t)
            if (fibers[t].line != fibers[first].line || fibers[t].barriers != fibers[first].barriers)
              return fail("block (%u, %u, %u): thread %u waits at the __syncthreads() of line %u, thread %u at "
                          "line %u, or passed a different number of barriers (divergent barrier)", bx, by, bz, first,
                          unsigned(fibers[first].line), t, unsigned(fibers[t].line));
          for (auto& f : fibers) f.state = RUNNING;
        }
      }
  return 0;
}

// ---- calling a kernel from an array of pointers to its argument values (as cuLaunchKernel does) ----------
template <class T> struct ParamInfo {
  static constexpr size_t size = sizeof(T), pointee = 0;
  static constexpr int is_pointer = 0, pointee_const = 0;
};
template <class T> struct ParamInfo<T*> {
  static constexpr size_t size = sizeof(T*), pointee = sizeof(T);
  static constexpr int is_pointer = 1, pointee_const = std::is_const<T>::value;
};

template <class... A> struct Call {
  void (*kernel)(A...);
  void** args;
  template <size_t... I> void invoke(std::index_sequence<I...>) {
    kernel(*static_cast<std::decay_t<A>*>(args[I])...);
  }
  static void run(void* self) { static_cast<Call*>(self)->invoke(std::index_sequence_for<A...>{}); }
};

template <class... A>
int launch(void (*kernel)(A...), const unsigned* g, const unsigned* b, size_t smem, void** args) {
  Call<A...> call{kernel, args};
  return run_grid(dim3(g[0], g[1], g[2]), dim3(b[0], b[1], b[2]), smem, &Call<A...>::run, &call);
}

// params[4*i .. 4*i+3] = size, is_pointer, pointee size, pointee is const
template <class... A> int describe(void (*)(A...), size_t* params) {
  const size_t table[] = {0, ParamInfo<std::decay_t<A>>::size..., 0};
  const size_t ptr[] = {0, size_t(ParamInfo<std::decay_t<A>>::is_pointer)..., 0};
  const size_t pointee[] = {0, ParamInfo<std::decay_t<A>>::pointee..., 0};
  const size_t cnst[] = {0, size_t(ParamInfo<std::decay_t<A>>::pointee_const)..., 0};
  if (params)
    for (size_t i = 0; i < sizeof...(A); ++i) {
      params[4 * i] = table[i + 1];
      params[4 * i + 1] = ptr[i + 1];
      params[4 * i + 2] = pointee[i + 1];
      params[4 * i + 3] = cnst[i + 1];
    }
  return int(sizeof...(A));
}
}  // namespace emu
}  // namespace

// ---- device functions and intrinsics used by CUDA C code ------------------------------------------------
#define __syncthreads() ::emu::barrier(__LINE__)
template <class A, class B> inline std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }
template <class A, class B> inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }
template <class T> inline T __ldg(const T* p) { return *p; }
inline float __int_as_float(int i) { float f; memcpy(&f, &i, sizeof f); return f; }
inline int __float_as_int(float f) { int i; memcpy(&i, &f, sizeof i); return i; }
inline double __longlong_as_double(long long i) { double d; memcpy(&d, &i, sizeof d); return d; }
inline long long __double_as_longlong(double d) { long long i; memcpy(&i, &d, sizeof i); return i; }
inline float __expf(float v) { return expf(v); }
inline float __logf(float v) { return logf(v); }
inline float __powf(float a, float b) { return powf(a, b); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float v) { return 1.0f / sqrtf(v); }
inline double rsqrt(double v) { return 1.0 / sqrt(v); }
template <class T> inline T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }  // one OS thread
inline void __threadfence() {}
inline void __threadfence_block() {}

NPCONV_EMU_API const char* npconv_emu_error() { return emu::error; }
NPCONV_EMU_API void npconv_emu_set_order(int order) { emu::thread_order = order; }
NPCONV_EMU_API size_t npconv_emu_static_smem() { return emu::static_smem(); }

#define NPCONV_EMU_EXPORT(k)                                                                          \
  NPCONV_EMU_API int npconv_emu_launch_##k(const unsigned* g, const unsigned* b, size_t smem,       \
                                           void** args) {                                           \
    return ::emu::launch(k, g, b, smem, args);                                                      \
  }                                                                                                 \
  NPCONV_EMU_API int npconv_emu_describe_##k(size_t* params) { return ::emu::describe(k, params); }
