/* The int8 multiply-accumulate peak of one core: AVX512-VNNI vpdpbusd on 12 independent accumulators.
 *
 *     gcc -O2 -mavx512f -mavx512bw -mavx512vnni vnni_peak.c -o vnni_peak && ./vnni_peak
 *
 * AMD EPYC host (no AMX), 2026-12-01: 462.9 GOPS per thread. OpenVINO's int8 GEMMs in the 2-block PixArt
 * profile (pixart-2blocks-*.txt, one thread) run at 86-98 % of it: a 1152x1152 projection of 1024 tokens
 * in 12.2 ms (446 GOPS), ff.net.0 with its GELU in 27.3 ms (400 GOPS), ff.net.2 in 24.1 ms (452 GOPS).
 */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
int main(void){
  __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(2);
  __m512i c0=_mm512_setzero_si512(),c1=c0,c2=c0,c3=c0,c4=c0,c5=c0,c6=c0,c7=c0,c8=c0,c9=c0,c10=c0,c11=c0;
  long iters = 200000000L;
  struct timespec t0,t1; clock_gettime(CLOCK_MONOTONIC,&t0);
  for(long i=0;i<iters;i++){
    c0=_mm512_dpbusd_epi32(c0,a,b); c1=_mm512_dpbusd_epi32(c1,a,b); c2=_mm512_dpbusd_epi32(c2,a,b);
    c3=_mm512_dpbusd_epi32(c3,a,b); c4=_mm512_dpbusd_epi32(c4,a,b); c5=_mm512_dpbusd_epi32(c5,a,b);
    c6=_mm512_dpbusd_epi32(c6,a,b); c7=_mm512_dpbusd_epi32(c7,a,b); c8=_mm512_dpbusd_epi32(c8,a,b);
    c9=_mm512_dpbusd_epi32(c9,a,b); c10=_mm512_dpbusd_epi32(c10,a,b); c11=_mm512_dpbusd_epi32(c11,a,b);
    __asm__ volatile("" : "+v"(c0),"+v"(c1),"+v"(c2),"+v"(c3),"+v"(c4),"+v"(c5));
    __asm__ volatile("" : "+v"(c6),"+v"(c7),"+v"(c8),"+v"(c9),"+v"(c10),"+v"(c11));
  }
  clock_gettime(CLOCK_MONOTONIC,&t1);
  double s=(t1.tv_sec-t0.tv_sec)+(t1.tv_nsec-t0.tv_nsec)*1e-9;
  __m512i t=_mm512_add_epi32(c0,c11);
  double ops = (double)iters*12*64*2;
  printf("int8 VNNI peak: %.1f GOPS/thread (%.3f s, check %d)\n", ops/s/1e9, s, _mm512_reduce_add_epi32(t)&1);
  return 0;
}
