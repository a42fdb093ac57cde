// Runs a plan of kernel launches (src/model/fused/plan.rs) on the CPU emulator
// (emulator.h), on buffers read from files, and writes the buffers back: the test suite's
// `kernels` module builds it with g++ and drives it. The kernels' source (kernels.cu) and
// the list of their entry points (registry.inc: `KERNEL(name)` lines) are the test's,
// written beside the build.
//
// A job, one command a line:
//   buffer ID BYTES PATH    the buffer's bytes from PATH (`-`: zeros)
//   launch NAME GX GY THREADS ARG..
//                           a grid of GX × GY blocks of THREADS; ARG: `b:ID` (an
//                           address), `n` (null), `l:I64`, `i:I32`,
//                           `f:BITS` (an f32 as its hex bits)
//   addresses ID FIELD..    a buffer of u64s: FIELD `b:ID` (that buffer's address) or
//                           `v:N` (the number N), as a kernel's descriptor table holds
//   write ID PATH           the buffer's bytes into PATH
// An argument of another type than the kernel's parameter, a wrong count, or an unknown
// kernel stops the job with a message naming it.

#include "emulator.h"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

#include "kernels.cu"

namespace {

enum class Kind { Address, I64, I32, F32 };

struct Value {
    Kind kind;
    unsigned long long u = 0;
    long long l = 0;
    int i = 0;
    float f = 0.0f;
};

const char* kind_name(Kind k) {
    switch (k) {
        case Kind::Address: return "an address (u64)";
        case Kind::I64: return "an i64";
        case Kind::I32: return "an i32";
        case Kind::F32: return "an f32";
    }
    return "?";
}

template <typename T> struct Param;
template <> struct Param<unsigned long long> {
    static constexpr Kind kind = Kind::Address;
    static unsigned long long get(const Value& v) { return v.u; }
};
template <> struct Param<const unsigned long long*> {
    static constexpr Kind kind = Kind::Address;
    static const unsigned long long* get(const Value& v) {
        return reinterpret_cast<const unsigned long long*>(v.u);
    }
};
template <> struct Param<long long> {
    static constexpr Kind kind = Kind::I64;
    static long long get(const Value& v) { return v.l; }
};
template <> struct Param<int> {
    static constexpr Kind kind = Kind::I32;
    static int get(const Value& v) { return v.i; }
};
template <> struct Param<float> {
    static constexpr Kind kind = Kind::F32;
    static float get(const Value& v) { return v.f; }
};

// Checks a launch's arguments against the kernel's parameters, once, and returns what each
// emulated thread runs.
using Invoker =
    std::function<std::function<void()>(const std::string&, const std::vector<Value>&)>;

template <typename... A, std::size_t... I>
void call(void (*f)(A...), const std::vector<Value>& args, std::index_sequence<I...>) {
    f(Param<A>::get(args[I])...);
}

template <typename... A>
Invoker invoker(void (*f)(A...)) {
    return [f](const std::string& name, const std::vector<Value>& args) {
        constexpr Kind kinds[] = {Param<A>::kind...};
        if (args.size() != sizeof...(A)) {
            throw std::runtime_error(name + ": " + std::to_string(args.size()) +
                                     " arguments for " + std::to_string(sizeof...(A)) +
                                     " parameters");
        }
        for (std::size_t p = 0; p < sizeof...(A); ++p) {
            if (args[p].kind != kinds[p]) {
                throw std::runtime_error(name + ": argument " + std::to_string(p) + " is " +
                                         kind_name(args[p].kind) + ", the parameter " +
                                         kind_name(kinds[p]));
            }
        }
        return [f, args] { call(f, args, std::index_sequence_for<A...>{}); };
    };
}

const std::map<std::string, Invoker>& kernels() {
    static const std::map<std::string, Invoker> table = {
#define KERNEL(name) {#name, invoker(&name)},
#include "registry.inc"
#undef KERNEL
    };
    return table;
}

std::vector<unsigned char> read_file(const std::string& path, std::size_t bytes) {
    std::vector<unsigned char> out(bytes, 0);
    if (path == "-") {
        return out;
    }
    std::ifstream in(path, std::ios::binary);
    if (!in.read(reinterpret_cast<char*>(out.data()), (std::streamsize)bytes)) {
        throw std::runtime_error("cannot read " + std::to_string(bytes) + " bytes of " + path);
    }
    return out;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::cerr << "usage: emulator JOB\n";
        return 2;
    }
    try {
        // Each buffer exactly its bytes long (operator new aligns them to 16, enough for
        // any element), so that the sanitizers stop a read or write one byte past it.
        std::map<std::string, std::vector<unsigned char>> buffers;
        std::map<std::string, std::size_t> sizes;
        std::ifstream job(argv[1]);
        std::string line;
        while (std::getline(job, line)) {
            std::istringstream words(line);
            std::string command;
            words >> command;
            if (command == "buffer") {
                std::string id, path;
                std::size_t bytes = 0;
                words >> id >> bytes >> path;
                const auto data = read_file(path, bytes);
                auto& b = buffers[id];
                b.assign(std::max<std::size_t>(bytes, 1), 0);
                if (bytes > 0) std::memcpy(b.data(), data.data(), bytes);
                sizes[id] = bytes;
            } else if (command == "addresses") {
                std::string id, field;
                words >> id;
                std::vector<unsigned long long> table;
                while (words >> field) {
                    if (field.rfind("b:", 0) == 0) {
                        auto it = buffers.find(field.substr(2));
                        if (it == buffers.end()) throw std::runtime_error(id + ": no buffer " + field);
                        table.push_back((unsigned long long)(std::uintptr_t)it->second.data());
                    } else if (field.rfind("v:", 0) == 0) {
                        table.push_back(std::stoull(field.substr(2)));
                    } else {
                        throw std::runtime_error(id + ": bad field " + field);
                    }
                }
                auto& b = buffers[id];
                b.assign(std::max<std::size_t>(8 * table.size(), 1), 0);
                if (!table.empty()) std::memcpy(b.data(), table.data(), 8 * table.size());
                sizes[id] = 8 * table.size();
            } else if (command == "launch") {
                std::string name;
                unsigned gx = 0, gy = 0, threads = 0;
                words >> name >> gx >> gy >> threads;
                std::vector<Value> args;
                std::string a;
                while (words >> a) {
                    Value v{Kind::Address};
                    if (a == "n") {
                        v.u = 0;
                    } else if (a.rfind("b:", 0) == 0) {
                        auto it = buffers.find(a.substr(2));
                        if (it == buffers.end()) throw std::runtime_error(name + ": no buffer " + a);
                        v.u = (unsigned long long)(std::uintptr_t)it->second.data();
                    } else if (a.rfind("l:", 0) == 0) {
                        v.kind = Kind::I64;
                        v.l = std::stoll(a.substr(2));
                    } else if (a.rfind("i:", 0) == 0) {
                        v.kind = Kind::I32;
                        v.i = std::stoi(a.substr(2));
                    } else if (a.rfind("f:", 0) == 0) {
                        v.kind = Kind::F32;
                        const unsigned bits = (unsigned)std::stoul(a.substr(2), nullptr, 16);
                        v.f = __uint_as_float(bits);
                    } else {
                        throw std::runtime_error(name + ": bad argument " + a);
                    }
                    args.push_back(v);
                }
                auto it = kernels().find(name);
                if (it == kernels().end()) throw std::runtime_error("no kernel " + name);
                emulator::launch(dim3{gx, gy, 1}, threads, it->second(name, args));
            } else if (command == "schedule") {
                std::string order;
                words >> order;
                if (order != "forward" && order != "reversed") throw std::runtime_error("schedule is forward or reversed, not " + order);
                emulator::reversed = order == "reversed";
            } else if (command == "write") {
                std::string id, path;
                words >> id >> path;
                std::ofstream out(path, std::ios::binary);
                out.write(reinterpret_cast<const char*>(buffers.at(id).data()),
                          (std::streamsize)sizes.at(id));
            } else if (!command.empty()) {
                throw std::runtime_error("unknown command " + command);
            }
        }
    } catch (const std::exception& e) {
        std::cerr << "emulator: " << e.what() << "\n";
        return 1;
    }
    return 0;
}
