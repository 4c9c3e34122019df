/* Transformers for xform_member (v1 -> v2): balance = deposits - withdrawals. */
#include "upstare_transformers.h"

int xf_acct(const struct account__old *old, struct account *new)
{
    new->balance = old->deposits - old->withdrawals;
    return 0;
}

int xf_main(struct main__frame__old *old, struct main__frame__new *new)
{
    new->mine->balance = old->mine->deposits - old->mine->withdrawals;
    return 0;
}
