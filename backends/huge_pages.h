// Transparent huge pages for fresh output buffers; shared by the C++ kernels
// (pasted in by native.py).
#include <cstddef>
#include <cstdint>
#include <sys/mman.h>

// Fresh buffers of tens of MiB (saved states, node caches, packed Gaussians,
// input gradients) are first touched by the kernels; on 4 KiB pages that is one page
// fault per 4 KiB, which on a busy machine costs more than the writes (42 MiB
// fresh and filled: 37 ms on 4 KiB pages, 14 ms on huge pages, load 3).  Asks
// for transparent huge pages on the 2 MiB-aligned inside of the buffer (a no-op
// where the system does not offer them on request); the contents are unchanged.
static inline void advise_huge_pages(const void* data, size_t bytes) {
#ifdef MADV_HUGEPAGE
    const uintptr_t huge = uintptr_t(1) << 21;
    const uintptr_t begin = (uintptr_t(data) + huge - 1) & ~(huge - 1), end = (uintptr_t(data) + bytes) & ~(huge - 1);
    if (data && end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
    (void)data; (void)bytes;
#endif
}
