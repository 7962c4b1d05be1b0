// The emulator's scheduler and the CUDA runtime calls the launchers make (see simt.h).
#include "simt.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <deque>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <vector>

namespace simt {
namespace {

// The device the launchers see: LLMKERN_SIMT_ARCH (sm75, sm80, sm86, sm89 or sm90, the default)
// sets its compute capability and the shared memory a block may opt into; it has few
// multiprocessors, so that grids sized from the SM count stay small and their grid-stride loops go
// round more than once.
constexpr int kMultiProcessors = 2;
constexpr int kDefaultSharedLimit = 48 * 1024;

struct Arch {
  int major, minor, max_shared_optin;
};

Arch device_arch() {
  const char* env = std::getenv("LLMKERN_SIMT_ARCH");
  const std::string name = env && *env ? env : "sm90";
  if (name == "sm75") return {7, 5, 64 * 1024};
  if (name == "sm80") return {8, 0, 163 * 1024};
  if (name == "sm86") return {8, 6, 99 * 1024};
  if (name == "sm89") return {8, 9, 99 * 1024};
  if (name == "sm90") return {9, 0, 227 * 1024};
  throw Fault("LLMKERN_SIMT_ARCH must be sm75, sm80, sm86, sm89 or sm90, got '" + name + "'");
}
constexpr size_t kStackBytes = 256 * 1024;

enum class State { kRunnable, kAtBarrier, kInWarpOp, kExited };

struct CpAsyncCopy {
  void* dst;
  const void* src;
  bool valid;  // false: zero-fill, src not read
  long issued;  // the barrier epoch of the issue
};

// Racecheck of the modelled shared-memory instructions, per 16-byte chunk of dynamic shared
// memory. An epoch is the time between two __syncthreads of the block. A cp.async may land any
// time between its issue and its wait, so it races with a read by another warp in that window, and
// its data reach other warps only after the next barrier.
struct ChunkShadow {
  int writer = -1;           // the thread of the last cp.async into the chunk
  bool pending = false;      // issued, not yet waited for
  long written = -1;         // the epoch its wait completed it
  int reader_warp = -1;      // a warp that read the chunk in epoch `read`
  bool readers_many = false; // more than one warp read it in epoch `read`
  long read = -1;
};

struct Thread {
  ucontext_t context;
  uint3 index;
  State state = State::kRunnable;
  std::vector<CpAsyncCopy> uncommitted;
  std::deque<std::vector<CpAsyncCopy>> groups;  // committed, oldest first
};

struct Warp {
  int arrived = 0;
  const char* op = nullptr;
  unsigned mask = 0;
  unsigned char in[32][64];
  unsigned char out[32][64];
};

struct Machine {
  bool running = false;
  const char* kernel_name = "";
  dim3 grid, block;
  uint3 block_idx{0, 0, 0};
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  std::vector<char*> stacks;
  Thread* current = nullptr;
  ucontext_t scheduler;
  const std::function<void()>* body = nullptr;
  unsigned char* shared = nullptr;
  size_t shared_capacity = 0;
  size_t shared_bytes = 0;
  int at_barrier = 0;
  std::string fault;
  cudaError_t last_error = cudaSuccess;
  std::map<const void*, int> max_dynamic_shared;  // cudaFuncSetAttribute
  std::set<void*> poisoned;                       // the static shared arrays this block has poisoned
  std::vector<ChunkShadow> shadow;                // racecheck state of dynamic shared memory
  long epoch = 0;                                 // barriers this block has passed
  unsigned long launches = 0;
};

Machine& machine() {
  static Machine m;
  return m;
}

std::string triple(unsigned x, unsigned y, unsigned z) {
  return "(" + std::to_string(x) + "," + std::to_string(y) + "," + std::to_string(z) + ")";
}

std::string where(const Machine& m, const Thread& t) {
  return "block " + triple(m.block_idx.x, m.block_idx.y, m.block_idx.z) + " thread " +
         triple(t.index.x, t.index.y, t.index.z);
}

// A fiber stack with a guard page below it, so an overflow faults instead of corrupting a neighbour.
char* new_stack() {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (p == MAP_FAILED) throw Fault("simt: cannot map a thread stack");
  mprotect(p, page, PROT_NONE);
  return static_cast<char*>(p) + page;
}

ChunkShadow& chunk_of(Machine& m, const void* p) {
  return m.shadow[static_cast<size_t>(static_cast<const unsigned char*>(p) - m.shared) / 16];
}

// A cp.async that lands while another warp may read the chunk (a read since the copy's issue).
void check_write_after_read(Machine& m, const ChunkShadow& c, long since, int warp, const char* when);

void perform(Machine& m, const std::vector<CpAsyncCopy>& copies, int thread) {
  for (const CpAsyncCopy& c : copies) {
    ChunkShadow& shadow = chunk_of(m, c.dst);
    check_write_after_read(m, shadow, c.issued, thread / 32, "lands");
    if (c.valid) {
      std::memcpy(c.dst, c.src, 16);
    } else {
      std::memset(c.dst, 0, 16);
    }
    if (shadow.writer == thread) {
      shadow.pending = false;
      shadow.written = m.epoch;
    }
  }
}

void thread_main() {
  Machine& m = machine();
  try {
    (*m.body)();
  } catch (const std::exception& e) {
    m.fault = std::string("exception: ") + e.what();
  } catch (...) {
    m.fault = "unknown exception";
  }
  // Copies nobody waited for are never performed: whoever reads them (another thread, after this
  // one exits) reads a race, and sees the poison.
  m.current->state = State::kExited;
}  // returns to uc_link: the scheduler

void park(Machine& m, State state) {
  Thread& t = *m.current;
  t.state = state;
  swapcontext(&t.context, &m.scheduler);
}

enum class Order { kForward, kReverse, kRandom };

struct Schedule {
  Order order = Order::kForward;
  unsigned long seed = 0;
};

Schedule read_schedule() {
  Schedule s;
  const char* env = std::getenv("LLMKERN_SIMT_SCHEDULE");
  const std::string v = env ? env : "forward";
  if (v == "forward" || v.empty()) {
    s.order = Order::kForward;
  } else if (v == "reverse") {
    s.order = Order::kReverse;
  } else if (v.rfind("random:", 0) == 0) {
    s.order = Order::kRandom;
    s.seed = std::stoul(v.substr(7));
  } else {
    throw Fault("LLMKERN_SIMT_SCHEDULE must be forward, reverse or random:SEED, got '" + v + "'");
  }
  return s;
}

std::vector<long> ordering(long n, const Schedule& s, unsigned long salt) {
  std::vector<long> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0L);
  if (s.order == Order::kReverse) std::reverse(order.begin(), order.end());
  if (s.order == Order::kRandom) {
    std::mt19937_64 rng(s.seed * 1000003ul + salt);
    std::shuffle(order.begin(), order.end(), rng);
  }
  return order;
}

const char* state_name(State s) {
  switch (s) {
    case State::kRunnable: return "runnable";
    case State::kAtBarrier: return "at __syncthreads";
    case State::kInWarpOp: return "in a warp instruction";
    case State::kExited: return "exited";
  }
  return "?";
}

std::string deadlock_report(const Machine& m, int n) {
  std::string r = "deadlock: no thread can go on. ";
  int shown = 0;
  for (int i = 0; i < n && shown < 8; ++i) {
    const Thread& t = m.threads[i];
    if (t.state == State::kExited) continue;
    r += "thread " + triple(t.index.x, t.index.y, t.index.z) + " " + state_name(t.state);
    if (t.state == State::kInWarpOp) r += std::string(" (") + m.warps[i / 32].op + ")";
    r += "; ";
    ++shown;
  }
  int exited = 0;
  for (int i = 0; i < n; ++i) exited += m.threads[i].state == State::kExited;
  return r + std::to_string(exited) + " of " + std::to_string(n) + " threads exited";
}

void run_block(Machine& m, const Schedule& schedule, unsigned long salt) {
  const int n = static_cast<int>(m.block.x * m.block.y * m.block.z);
  while (static_cast<int>(m.stacks.size()) < n) m.stacks.push_back(new_stack());
  if (static_cast<int>(m.threads.size()) < n) m.threads.resize(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    Thread& t = m.threads[i];
    t.index = {i % m.block.x, (i / m.block.x) % m.block.y, i / (m.block.x * m.block.y)};
    t.state = State::kRunnable;
    t.uncommitted.clear();
    t.groups.clear();
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = m.stacks[i];
    t.context.uc_stack.ss_size = kStackBytes;
    t.context.uc_link = &m.scheduler;
    makecontext(&t.context, thread_main, 0);
  }
  m.warps.assign(static_cast<size_t>((n + 31) / 32), Warp{});
  if (m.shared_bytes) std::memset(m.shared, 0xff, m.shared_bytes);  // NaN in fp32, fp16 and bf16
  m.poisoned.clear();
  m.shadow.assign(m.shared_bytes / 16, ChunkShadow{});
  m.epoch = 0;
  m.at_barrier = 0;
  const std::vector<long> order = ordering(n, schedule, salt);
  for (;;) {
    bool ran = false;
    for (long i : order) {
      Thread& t = m.threads[static_cast<size_t>(i)];
      if (t.state != State::kRunnable) continue;
      ran = true;
      m.current = &t;
      swapcontext(&m.scheduler, &t.context);
      m.current = nullptr;
      if (!m.fault.empty()) throw Fault(m.fault);
    }
    int live = 0;
    for (int i = 0; i < n; ++i) live += m.threads[i].state != State::kExited;
    if (live == 0) return;
    if (m.at_barrier == live) {
      for (int i = 0; i < n; ++i) {
        if (m.threads[i].state == State::kAtBarrier) m.threads[i].state = State::kRunnable;
      }
      m.at_barrier = 0;
      ++m.epoch;
      continue;
    }
    if (!ran) throw Fault(deadlock_report(m, n));
  }
}

cudaError_t check_config(const Machine& m, const Launch& l, const void* kernel) {
  const unsigned long threads = static_cast<unsigned long>(l.block.x) * l.block.y * l.block.z;
  if (threads == 0 || threads > 1024 || l.block.z > 64) return cudaErrorInvalidConfiguration;
  if (l.grid.x == 0 || l.grid.y == 0 || l.grid.z == 0 || l.grid.y > 65535 || l.grid.z > 65535 ||
      l.grid.x > 2147483647u) {
    return cudaErrorInvalidConfiguration;
  }
  const auto it = m.max_dynamic_shared.find(kernel);
  const size_t limit = it == m.max_dynamic_shared.end() ? kDefaultSharedLimit : static_cast<size_t>(it->second);
  if (l.shared_bytes > limit) return cudaErrorInvalidValue;
  return cudaSuccess;
}

}  // namespace

void fail(const std::string& message) {
  Machine& m = machine();
  if (!m.running || m.current == nullptr) throw Fault("simt: " + message);
  m.fault = message + " [" + where(m, *m.current) + "]";
  m.current->state = State::kExited;
  swapcontext(&m.current->context, &m.scheduler);
  std::abort();  // a failed thread is never resumed
}

const uint3& thread_index() { return machine().current->index; }
const uint3& block_index() { return machine().block_idx; }
const dim3& block_dim() { return machine().block; }
const dim3& grid_dim() { return machine().grid; }
unsigned char* dynamic_shared() { return machine().shared; }

void poison_shared_once(void* p, size_t bytes) {
  if (machine().poisoned.insert(p).second) std::memset(p, 0xff, bytes);
}

bool in_dynamic_shared(const void* p, size_t bytes) {
  const Machine& m = machine();
  const auto* c = static_cast<const unsigned char*>(p);
  return m.shared != nullptr && c >= m.shared && c + bytes <= m.shared + m.shared_bytes;
}

namespace {

void check_write_after_read(Machine& m, const ChunkShadow& c, long since, int warp, const char* when) {
  if (c.read >= since && (c.readers_many || c.reader_warp != warp)) {
    fail(std::string("shared-memory race: a cp.async ") + when + " on 16 bytes warp " +
         std::to_string(c.reader_warp) + " read with no __syncthreads between (write after read)");
  }
}

}  // namespace

void shared_read(const void* p, size_t bytes) {
  Machine& m = machine();
  const int warp = static_cast<int>(m.current - m.threads.data()) / 32;
  const auto* first = static_cast<const unsigned char*>(p);
  for (const unsigned char* q = first - (first - m.shared) % 16; q < first + bytes; q += 16) {
    ChunkShadow& c = chunk_of(m, q);
    // wait_group makes a copy visible to its own thread only: any warp instruction reading it, the
    // issuing warp's included, needs the wait and then a barrier.
    if (c.writer >= 0 && (c.pending || c.written == m.epoch)) {
      fail("shared-memory race: warp " + std::to_string(warp) + " reads 16 bytes that thread " +
           std::to_string(c.writer) + "'s cp.async " + (c.pending ? "may still be writing" : "wrote in this epoch") +
           " (read after write; a barrier after the wait orders them)");
    }
    if (c.read == m.epoch && c.reader_warp != warp) {
      c.readers_many = true;
    } else if (c.read != m.epoch) {
      c.read = m.epoch;
      c.reader_warp = warp;
      c.readers_many = false;
    }
  }
}

void syncthreads() {
  Machine& m = machine();
  ++m.at_barrier;
  park(m, State::kAtBarrier);
}

void warp_exchange(const char* op, unsigned mask, const void* in, size_t in_bytes, void* out, size_t out_bytes,
                   const WarpCompute& compute) {
  Machine& m = machine();
  Thread& t = *m.current;
  const int linear = static_cast<int>(&t - m.threads.data());
  const int lane = linear & 31;
  const int first = linear - lane;
  const int n = static_cast<int>(m.block.x * m.block.y * m.block.z);
  const int lanes = std::min(32, n - first);
  const unsigned existing = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  if (!((mask >> lane) & 1u)) fail(std::string(op) + ": the calling lane is not in its own mask");
  if (mask & ~existing) fail(std::string(op) + ": the mask names lanes past the end of the block");
  Warp& w = m.warps[static_cast<size_t>(linear / 32)];
  if (w.arrived == 0) {
    w.op = op;
    w.mask = mask;
  } else if (std::strcmp(w.op, op) != 0 || w.mask != mask) {
    fail(std::string("lanes of one warp meet at different warp instructions: ") + w.op + " and " + op);
  }
  for (int l = 0; l < 32; ++l) {
    if (((mask >> l) & 1u) && m.threads[static_cast<size_t>(first + l)].state == State::kExited) {
      fail(std::string(op) + ": lane " + std::to_string(l) + " of the mask has exited");
    }
  }
  std::memcpy(w.in[lane], in, in_bytes);
  if (++w.arrived == __builtin_popcount(mask)) {
    compute(w.in, w.out, mask);
    w.arrived = 0;
    for (int l = 0; l < 32; ++l) {
      Thread& other = m.threads[static_cast<size_t>(first + l)];
      if (((mask >> l) & 1u) && &other != &t) other.state = State::kRunnable;
    }
  } else {
    park(m, State::kInWarpOp);
  }
  std::memcpy(out, w.out[lane], out_bytes);
}

void cp_async(void* dst, const void* src, bool valid) {
  if (reinterpret_cast<std::uintptr_t>(dst) % 16 != 0 || !in_dynamic_shared(dst, 16)) {
    fail("cp.async: the destination is not 16 aligned bytes of the block's shared memory");
  }
  if (valid && reinterpret_cast<std::uintptr_t>(src) % 16 != 0) fail("cp.async: misaligned 16-byte global source");
  Machine& m = machine();
  const int thread = static_cast<int>(m.current - m.threads.data());
  ChunkShadow& c = chunk_of(m, dst);
  check_write_after_read(m, c, m.epoch, thread / 32, "is issued");
  if (c.pending && c.writer != thread) {
    fail("shared-memory race: two threads' cp.async write the same 16 bytes (thread " + std::to_string(c.writer) +
         "'s is still in flight)");
  }
  c.writer = thread;
  c.pending = true;
  m.current->uncommitted.push_back({dst, src, valid, m.epoch});
}

void cp_async_commit() {
  Thread& t = *machine().current;
  t.groups.push_back(std::move(t.uncommitted));
  t.uncommitted.clear();
}

void cp_async_wait(int pending) {
  Machine& m = machine();
  Thread& t = *m.current;
  while (static_cast<int>(t.groups.size()) > pending) {
    perform(m, t.groups.front(), static_cast<int>(&t - m.threads.data()));
    t.groups.pop_front();
  }
}

void run_grid(const Launch& launch, const void* kernel, const std::function<void()>& body) {
  Machine& m = machine();
  if (m.running) fail("a kernel launched a kernel");
  const cudaError_t config = check_config(m, launch, kernel);
  if (config != cudaSuccess) {
    m.last_error = config;
    return;
  }
  const Schedule schedule = read_schedule();
  device_arch();  // a bad LLMKERN_SIMT_ARCH is an error at the first launch, not only at a query
  if (launch.shared_bytes > m.shared_capacity) {
    std::free(m.shared);
    m.shared = static_cast<unsigned char*>(std::aligned_alloc(128, (launch.shared_bytes + 127) / 128 * 128));
    m.shared_capacity = launch.shared_bytes;
  }
  m.shared_bytes = launch.shared_bytes;
  m.grid = launch.grid;
  m.block = launch.block;
  m.kernel_name = launch.kernel_name;
  m.body = &body;
  m.fault.clear();
  m.running = true;
  const long blocks = static_cast<long>(launch.grid.x) * launch.grid.y * launch.grid.z;
  const unsigned long launch_number = m.launches++;
  try {
    for (long b : ordering(blocks, schedule, launch_number)) {
      m.block_idx = {static_cast<unsigned>(b % launch.grid.x), static_cast<unsigned>((b / launch.grid.x) % launch.grid.y),
                     static_cast<unsigned>(b / (static_cast<long>(launch.grid.x) * launch.grid.y))};
      run_block(m, schedule, launch_number * 7919ul + static_cast<unsigned long>(b));
    }
  } catch (const Fault& f) {
    m.running = false;
    m.fault.clear();
    throw Fault(std::string("simt: kernel ") + launch.kernel_name + ": " + f.what());
  }
  m.running = false;
}

}  // namespace simt

// --- the CUDA runtime calls of the launchers and bindings -----------------------------------

cudaError_t cudaGetLastError() {
  const cudaError_t e = simt::machine().last_error;
  simt::machine().last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return simt::machine().last_error; }

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorNoKernelImageForDevice: return "cudaErrorNoKernelImageForDevice";
    default: return "cudaError (emulated)";
  }
}

const char* cudaGetErrorString(cudaError_t error) { return cudaGetErrorName(error); }

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: *value = simt::device_arch().major; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = simt::device_arch().minor; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = simt::kMultiProcessors; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = simt::device_arch().max_shared_optin; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || value > simt::device_arch().max_shared_optin) return cudaErrorInvalidValue;
  simt::machine().max_dynamic_shared[func] = value;
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void*, int block_size, size_t) {
  *blocks = block_size > 512 ? 1 : 2;
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t) {
  std::memset(dst, value, bytes);
  return cudaSuccess;
}
